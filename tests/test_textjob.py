"""The text job's config rules (ljax.config) and its one-line errors for missing inputs."""

import pytest

from ljax import config as config_lib, textjob


def text_config(**overrides):
    c = config_lib.base()
    c.model, c.dataset, c.nm, c.sparsity = 'minilm', 'wordnet_glosses', '2:4', 0.5
    c.teacher, c.distill = 'dense', 'cosine'
    for k, v in overrides.items():
        c[k] = v
    return c


@pytest.mark.parametrize('distill', ['cosine', 'hidden'])
def test_a_text_config_validates_and_is_recognised(distill):
    c = text_config(distill=distill)
    config_lib.validate(c)
    assert textjob.is_text(c) and not textjob.is_text(config_lib.base())


@pytest.mark.parametrize(
    'overrides, message',
    [
        (dict(dataset='fashion_mnist'), "dataset: model 'minilm' needs dataset 'wordnet_glosses'"),
        (dict(mode='evaluate'), "mode: model 'minilm' runs mode 'search' only"),
        (dict(teacher=''), "teacher: model 'minilm' searches label-free"),
        (dict(distill='kl'), "teacher: model 'minilm' searches label-free"),
        (dict(model='mlp'), "model: dataset 'wordnet_glosses' needs a text model (minilm)"),
        (dict(max_seq_length=1), 'max_seq_length: expected an integer in [2, 512]'),
        (dict(probe_examples=0), 'probe_examples: expected an integer >= 1'),
        (dict(calibration_examples=0), 'calibration_examples: expected an integer >= 1'),
        (dict(search_glosses='test'), "search_glosses: expected one of 'search', 'held_out'"),
    ],
)
def test_bad_text_configs_name_the_field(overrides, message):
    with pytest.raises(ValueError) as e:
        config_lib.validate(text_config(**overrides))
    assert message in str(e.value) and '\n' not in str(e.value)


def test_missing_inputs_are_one_line(tmp_path):
    with pytest.raises(ValueError, match='is not a directory'):
        textjob.TextJob(text_config(pretrained=str(tmp_path / 'nowhere')))
    with pytest.raises(ValueError, match='apt-get install wordnet-base'):
        textjob.TextJob(text_config(data_dir=str(tmp_path)))
