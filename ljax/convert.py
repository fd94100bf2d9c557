"""PyTorch <-> ljax weights for `resnet50`, `vgg19_cifar` and `resnet32_cifar`.

Key names are torchvision's (timm's `resnet50.tv_in1k` uses the same) and the authors'
(zyxxmu/lottery-jackpots) for the CIFAR models. Layouts: conv OIHW <-> HWIO; linear (out, in)
<-> Dense (in, out); the authors' 1x1-conv classifiers (classes, features, 1, 1) <-> Dense
(features, classes); BatchNorm weight/bias <-> scale/bias and running_mean/var <-> batch_stats
mean/var. Arrays are numpy float32.

torch is optional: it is imported only to read `.pth`/`.pt`/`.bin` files (torch tensors in a
dict are used through their methods). safetensors and `.npz` sources need no torch.

CLI: `python -m ljax.convert SRC DST.npz --arch ARCH [--force]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ljax.models import get_model
from ljax.models.vgg import VGG19_BLOCKS

ARCHS = ('resnet50', 'vgg19_cifar', 'resnet32_cifar')
_CLASSIFIER = {'resnet50': 'fc', 'vgg19_cifar': 'classifier', 'resnet32_cifar': 'fc'}
_DEFAULT_CLASSES = {'resnet50': 1000, 'vgg19_cifar': 10, 'resnet32_cifar': 10}
# Keys of the authors' search state (`.mask` scores, `b_mask`) and BN's step counter: not weights.
_IGNORED_SUFFIXES = ('.mask', '.b_mask', '.num_batches_tracked')
_TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
_SHOWN = 5  # offending keys listed per kind in a mismatch message

Variables = dict[str, dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One tensor: where it lives on both sides and how its layout changes."""

    torch_key: str
    flax_path: tuple[str, ...]  # (collection, module..., leaf)
    flax_shape: tuple[int, ...]
    kind: str  # "conv" (OIHW<->HWIO), "dense" ((out,in)<->(in,out)), "same"

    def torch_shapes(self) -> list[tuple[int, ...]]:
        """Accepted torch shapes, the first being what `to_torch` writes by default."""
        if self.kind == 'conv':
            h, w, i, o = self.flax_shape
            return [(o, i, h, w)]
        if self.kind == 'dense':
            i, o = self.flax_shape
            return [(o, i), (o, i, 1, 1)]
        return [self.flax_shape]


# ----------------------------------------------------------------------------- key mapping


def _vgg_feature_indices() -> dict[str, int]:
    """`conv{b}_{j}` -> index of that conv in the authors' `features` nn.Sequential."""
    indices, i = {}, 0
    for block, widths in enumerate(VGG19_BLOCKS, start=1):
        for layer in range(1, len(widths) + 1):
            indices[f'{block}_{layer}'] = i
            i += 3  # conv, BN, ReLU
        i += 1  # max-pool
    return indices


_RESNET_RENAMES = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}


def _torch_module(arch: str, modules: tuple[str, ...]) -> str:
    """Flax module path -> torch module name (`layer1_0/downsample_conv` -> `layer1.0.downsample.0`)."""
    if arch == 'vgg19_cifar':
        (name,) = modules
        match = re.fullmatch(r'(conv|bn)(\d_\d)', name)
        if match:
            index = _vgg_feature_indices()[match.group(2)]
            return f'features.{index + (match.group(1) == "bn")}'
        return name
    parts = []
    for name in modules:
        match = re.fullmatch(r'layer(\d+)_(\d+)', name)
        if match:
            parts.append(f'layer{match.group(1)}.{match.group(2)}')
        else:
            parts.append(_RESNET_RENAMES.get(name, name))
    return '.'.join(parts)


_LEAF_TO_TORCH = {
    ('params', 'kernel'): 'weight',
    ('params', 'bias'): 'bias',
    ('params', 'scale'): 'weight',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix + (str(key),)))
        else:
            flat[prefix + (str(key),)] = value
    return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _entries(arch: str, config: Mapping[str, Any]) -> list[_Entry]:
    """Every tensor of `get_model(arch, **config)`."""
    model = get_model(arch, **config)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32), train=False)
    )
    entries = []
    for path, leaf in _flatten(abstract).items():
        collection, *modules, leaf_name = path
        torch_leaf = _LEAF_TO_TORCH[(collection, leaf_name)]
        shape = tuple(leaf.shape)
        kind = 'same'
        if leaf_name == 'kernel':
            kind = 'conv' if len(shape) == 4 else 'dense'
        key = f'{_torch_module(arch, tuple(modules))}.{torch_leaf}'
        entries.append(_Entry(key, tuple(path), shape, kind))
    return sorted(entries, key=lambda entry: _natural_key(entry.torch_key))


def _natural_key(key: str) -> list:
    """`layer1.2` before `layer1.10`: close to the order of a torch state_dict."""
    return [int(token) if token.isdigit() else token for token in re.split(r'(\d+)', key)]


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f'unknown arch {arch!r}; known: {", ".join(ARCHS)}')


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, 'shape', None)
    return tuple(int(d) for d in shape) if shape is not None else None


def _config_from_torch(arch: str, state: Mapping[str, Any]) -> dict[str, Any]:
    """num_classes (and ResNet-32 widths) read off the checkpoint's shapes; defaults if absent."""
    config: dict[str, Any] = {'num_classes': _DEFAULT_CLASSES[arch]}
    classifier = _shape(state.get(f'{_CLASSIFIER[arch]}.weight'))
    if classifier:
        config['num_classes'] = classifier[0]
    if arch == 'resnet32_cifar':
        keys = ('conv1.weight', 'layer2.0.conv1.weight', 'layer3.0.conv1.weight')
        shapes = [_shape(state.get(key)) for key in keys]
        if all(shapes):
            config['widths'] = tuple(shape[0] for shape in shapes)
    return config


def infer_model_config(variables: Mapping, arch: str) -> dict[str, Any]:
    """kwargs for `ljax.models.get_model(arch, **kwargs)` that rebuild the model of `variables`."""
    _check_arch(arch)
    params = variables['params']
    config: dict[str, Any] = {'num_classes': int(params[_CLASSIFIER[arch]]['kernel'].shape[-1])}
    if arch == 'resnet32_cifar':
        names = ('conv1', 'layer2_0', 'layer3_0')
        kernels = [params[names[0]]['kernel']] + [params[n]['conv1']['kernel'] for n in names[1:]]
        config['widths'] = tuple(int(k.shape[-1]) for k in kernels)
    return config


# ----------------------------------------------------------------------------- loading


def _to_numpy(value: Any) -> Any:
    """torch tensors -> numpy (floating ones as float32); other arrays as they are."""
    if hasattr(value, 'detach') and hasattr(value, 'numpy'):
        tensor = value.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        return tensor.numpy()
    return value


def _load_file(path: Path) -> Mapping[str, Any]:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f'no such file: {path}')
    if suffix in _TORCH_SUFFIXES:
        try:
            import torch
        except ImportError as error:
            raise ImportError(
                f'reading {path.name} needs PyTorch (pip install torch); '
                'a .safetensors or .npz copy of the state_dict needs only numpy'
            ) from error
        try:
            return torch.load(path, map_location='cpu', weights_only=True)
        except Exception as error:  # UnpicklingError, RuntimeError, EOFError...
            text = str(error)
            found = re.search(r'Unsupported global: GLOBAL (\S+)', text)
            detail = re.search(r'WeightsUnpickler error:\s*([^\n]+)', text)
            if found:
                reason = f'it pickles a {found.group(1)} besides tensors; save only its state_dict'
            elif detail:
                reason = f'{detail.group(1).strip()} (not a PyTorch checkpoint?)'
            else:  # torch's messages run to paragraphs: keep the first sentence
                reason = ' '.join(text.split()).split('. ')[0] or type(error).__name__
            raise ValueError(
                f'cannot read {path} with torch.load(weights_only=True): {reason}'
            ) from error
    if suffix == '.safetensors':
        from safetensors.numpy import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # SafetensorError derives from Exception only
            raise ValueError(f'cannot read {path} as safetensors: {error}') from error
    if suffix == '.npz':
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        except Exception as error:  # BadZipFile, ValueError for pickled members, OSError
            raise ValueError(f'cannot read {path} as .npz: {error}') from error
    raise ValueError(
        f'unknown checkpoint type {path.name!r}: expected .pth, .pt, .bin, .safetensors or .npz'
    )


def load_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A PyTorch state_dict as {key: numpy array}, from a mapping or a file.

    Unwraps `{'state_dict': ...}`, strips a `module.` prefix (DataParallel) and drops the
    authors' search-only `.mask` / `.b_mask` tensors and BN's `num_batches_tracked`.
    `.pth`/`.pt`/`.bin` files are read with `torch.load(weights_only=True)` only.
    """
    state = source if isinstance(source, Mapping) else _load_file(Path(source))
    if not isinstance(state, Mapping):
        raise ValueError(f'checkpoint holds a {type(state).__name__}, not a state_dict')
    if isinstance(state.get('state_dict'), Mapping):
        state = state['state_dict']
    cleaned = {}
    for key, value in state.items():
        key = str(key)
        key = key.removeprefix('module.')
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        cleaned[key] = _to_numpy(value)
    return cleaned


# ----------------------------------------------------------------------------- validation


def _mismatch_error(
    what: str, missing: list[str], unexpected: list[str], wrong: list[str], hint: str = ''
) -> ValueError:
    def listed(label: str, items: list[str]) -> str:
        more = f', ... ({len(items) - _SHOWN} more)' if len(items) > _SHOWN else ''
        return f'{len(items)} {label}: ' + ', '.join(items[:_SHOWN]) + more

    parts = [
        listed(label, items)
        for label, items in (
            ('missing', missing),
            ('unexpected', unexpected),
            ('wrong shape or dtype', wrong),
        )
        if items
    ]
    return ValueError(f'{what} does not match: ' + '; '.join(parts) + hint)


def _describe(arch: str, config: Mapping[str, Any]) -> str:
    details = ', '.join(f'{k}={v}' for k, v in config.items())
    return f'{arch} ({details})'


# ----------------------------------------------------------------------------- conversion


def from_torch(source: str | os.PathLike | Mapping[str, Any], arch: str) -> Variables:
    """PyTorch weights -> `{'params': ..., 'batch_stats': ...}` of numpy float32 arrays.

    `source` is a state_dict (tensors or arrays) or a `.pth`/`.pt`/`.bin`, `.safetensors` or
    `.npz` file (see `load_state_dict`). num_classes (and ResNet-32 widths) come from the
    checkpoint's shapes; `infer_model_config` gives them back. The result has exactly the
    structure of `get_model(arch, ...).init(...)`. Missing, unexpected or misshapen keys raise
    one ValueError naming them; nothing partial is returned.
    """
    _check_arch(arch)
    state = load_state_dict(source)
    config = _config_from_torch(arch, state)
    entries = _entries(arch, config)
    expected = {entry.torch_key for entry in entries}
    missing, wrong = [], []
    for entry in entries:
        if entry.torch_key not in state:
            missing.append(f'{entry.torch_key} (expected {entry.torch_shapes()[0]})')
            continue
        value = state[entry.torch_key]
        shape = _shape(value)
        dtype = getattr(value, 'dtype', None)
        if shape not in entry.torch_shapes() or not np.issubdtype(dtype, np.floating):
            found = f'{shape} {dtype}' if shape is not None else type(value).__name__
            wrong.append(f'{entry.torch_key} (expected {entry.torch_shapes()[0]}, found {found})')
    unexpected = [f'{key} (found {_shape(state[key])})' for key in state if key not in expected]
    if missing or unexpected or wrong:
        hint = ''
        if state and all(key.startswith(('params/', 'batch_stats/')) for key in state):
            hint = ' (this looks like an ljax variables file: use load_variables_npz)'
        raise _mismatch_error(
            f'checkpoint vs {_describe(arch, config)}', missing, unexpected, wrong, hint
        )

    flat = {}
    for entry in entries:
        value = np.asarray(state[entry.torch_key], dtype=np.float32)
        if entry.kind == 'conv':
            value = value.transpose(2, 3, 1, 0)
        elif entry.kind == 'dense':
            value = value.reshape(value.shape[:2]).T
        flat[entry.flax_path] = np.ascontiguousarray(value)
    return _unflatten(flat)


def to_torch(
    variables: Mapping,
    arch: str,
    mask: Mapping | None = None,
    *,
    classifier_as_conv: bool | None = None,
) -> dict[str, np.ndarray]:
    """ljax variables -> a PyTorch state_dict of numpy arrays (torch.from_numpy each to load).

    Keys are torchvision's (resnet50) or the authors' (CIFAR models), with int64 zero
    `num_batches_tracked` per BN so `load_state_dict(strict=True)` accepts it. `mask` is a tree
    shaped like (a subset of) `variables['params']` (or `{'params': ...}`; None leaves mean
    unmasked); where it is 0/False the weight is written as exactly 0. The classifier is a 1x1 conv (the authors' layout) for
    the CIFAR models and a linear for resnet50 unless `classifier_as_conv` says otherwise.
    """
    _check_arch(arch)
    if classifier_as_conv is None:
        classifier_as_conv = arch != 'resnet50'
    try:
        config = infer_model_config(variables, arch)
    except (KeyError, IndexError, TypeError, AttributeError) as error:
        raise ValueError(f'variables are not those of a {arch}: no {error}') from error
    entries = _entries(arch, config)
    given = {path: np.asarray(value) for path, value in _flatten(variables).items()}
    _check_flax_tree(given, entries, f'variables vs {_describe(arch, config)}')

    masks: dict[tuple[str, ...], np.ndarray] = {}
    if mask is not None:
        if set(mask) == {'params'}:
            mask = mask['params']
        masks = {
            ('params',) + path: np.asarray(value)
            for path, value in _flatten(mask).items()
            if value is not None
        }
        shapes = {entry.flax_path: entry.flax_shape for entry in entries}
        unknown = ['/'.join(p) for p in masks if p not in shapes]
        wrong = [
            f'{"/".join(p)} (expected {shapes[p]}, found {m.shape})'
            for p, m in masks.items()
            if p in shapes and m.shape != shapes[p]
        ]
        if unknown or wrong:
            raise _mismatch_error('mask vs params', [], unknown, wrong)

    state: dict[str, np.ndarray] = {}
    for entry in entries:
        value = given[entry.flax_path].astype(np.float32)
        if entry.flax_path in masks:
            value = np.where(masks[entry.flax_path].astype(bool), value, np.float32(0))
        if entry.kind == 'conv':
            value = value.transpose(3, 2, 0, 1)
        elif entry.kind == 'dense':
            value = value.T
            if classifier_as_conv:
                value = value[:, :, None, None]
        state[entry.torch_key] = np.ascontiguousarray(value)
        if entry.torch_key.endswith('.running_var'):
            counter = entry.torch_key.removesuffix('running_var') + 'num_batches_tracked'
            state[counter] = np.zeros((), np.int64)
    return state


def _check_flax_tree(given: Mapping[tuple[str, ...], np.ndarray], entries: list[_Entry], what: str):
    shapes = {entry.flax_path: entry.flax_shape for entry in entries}
    missing = [f'{"/".join(p)} (expected {s})' for p, s in shapes.items() if p not in given]
    unexpected = [f'{"/".join(p)} (found {v.shape})' for p, v in given.items() if p not in shapes]
    wrong = [
        f'{"/".join(p)} (expected {shapes[p]}, found {v.shape} {v.dtype})'
        for p, v in given.items()
        if p in shapes and (v.shape != shapes[p] or not np.issubdtype(v.dtype, np.floating))
    ]
    if missing or unexpected or wrong:
        raise _mismatch_error(what, missing, unexpected, wrong)


# ----------------------------------------------------------------------------- .npz files


def _atomic_savez(flat: Mapping[str, np.ndarray], path: Path) -> None:
    """Writes an .npz beside `path`, then renames it over `path`: never a half-written file."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(handle, 'wb') as file:
            np.savez(file, **flat)
            file.flush()
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_variables_npz(variables: Mapping, path: str | os.PathLike) -> None:
    """Saves a nested dict of arrays as `.npz`, keys joined with '/' (`params/conv1/kernel`).

    Atomic (temporary file, then rename); no pickling, so `load_variables_npz` reads it back
    with `allow_pickle=False`.
    """
    flat = {}
    for path_keys, value in _flatten(variables).items():
        if any('/' in key for key in path_keys):
            raise ValueError(
                f"key {path_keys} contains '/', which the .npz layout uses as separator"
            )
        array = np.asarray(value)
        if array.dtype == object:
            raise ValueError(f'{"/".join(path_keys)} is not a numeric array')
        flat['/'.join(path_keys)] = array
    _atomic_savez(flat, Path(path))


def load_variables_npz(path: str | os.PathLike) -> dict:
    """Reads a `save_variables_npz` file back into a nested dict of numpy arrays."""
    with np.load(path, allow_pickle=False) as archive:
        return _unflatten({tuple(key.split('/')): archive[key] for key in archive.files})


# ----------------------------------------------------------------------------- downloads

PRETRAINED_URLS = {
    # torchvision IMAGENET1K_V1 (76.13% top-1), the weights the paper's ResNet-50 starts from.
    'torchvision://resnet50': 'https://download.pytorch.org/models/resnet50-0676ba61.pth',
    # torchvision IMAGENET1K_V2 (80.86% top-1).
    'torchvision://resnet50_v2': 'https://download.pytorch.org/models/resnet50-11ad3fa6.pth',
}
_HASH_IN_NAME = re.compile(r'-([0-9a-f]{8,64})\.[^.]+$')


def download_pretrained(
    name: str, cache_dir: str | os.PathLike, *, sha256: str | None = None, timeout: float = 60.0
) -> Path:
    """Fetches a checkpoint into `cache_dir` (once) and returns its path.

    `name` is a key of PRETRAINED_URLS or an http(s) URL. The file is checked against `sha256`
    (a full hex digest or a prefix), by default the prefix torchvision puts in file names
    (`resnet50-0676ba61.pth`). A mismatch raises ValueError and leaves nothing in the cache.
    """
    url = PRETRAINED_URLS.get(name, name)
    if urllib.parse.urlparse(url).scheme not in ('http', 'https'):
        raise ValueError(f'unknown pretrained name {name!r}; known: {", ".join(PRETRAINED_URLS)}')
    filename = Path(urllib.parse.urlparse(url).path).name
    expected = sha256
    if expected is None:
        match = _HASH_IN_NAME.search(filename)
        if not match:
            raise ValueError(f'no checksum for {url}: pass sha256=')
        expected = match.group(1)
    expected = expected.lower()
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / filename
    if target.is_file() and _sha256(target).startswith(expected):
        return target

    handle, tmp = tempfile.mkstemp(dir=cache, prefix=f'.{filename}.', suffix='.part')
    try:
        digest = hashlib.sha256()
        with (
            os.fdopen(handle, 'wb') as file,
            urllib.request.urlopen(url, timeout=timeout) as response,
        ):
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                file.write(chunk)
        if not digest.hexdigest().startswith(expected):
            raise ValueError(
                f'checksum mismatch for {url}: sha256 {digest.hexdigest()} does not start with {expected}'
            )
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- CLI


_EXPORT_SUFFIXES = ('.pth', '.pt', '.safetensors')


def export_torch(src: str | os.PathLike, dst: str | os.PathLike, arch: str) -> int:
    """Writes ljax variables (or a jackpot .npz with its `mask`) as a PyTorch state_dict file.

    `.safetensors` needs no torch; `.pth`/`.pt` are written with `torch.save`. Atomic; returns the
    number of tensors written.
    """
    saved = load_variables_npz(src)
    if 'params' not in saved:
        raise ValueError(f'{src} holds no params/...: expected an ljax variables or jackpot .npz')
    variables = {k: saved[k] for k in ('params', 'batch_stats') if k in saved}
    state = to_torch(variables, arch, mask=saved.get('mask'))
    dst = Path(dst)
    handle, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f'.{dst.name}.', suffix='.tmp')
    os.close(handle)
    try:
        if dst.suffix == '.safetensors':
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp)
        else:
            try:
                import torch
            except ImportError:
                raise ImportError(
                    'writing .pth needs torch: pip install torch '
                    '(or export to .safetensors, which does not)'
                ) from None
            torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(state)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f'{self.prog}: error: {message}\n')


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog='python -m ljax.convert',
        description='Convert a PyTorch checkpoint (.pth/.pt/.bin, .safetensors, .npz) '
        'to ljax variables (.npz); or, when DST ends in .pth/.pt/.safetensors, export ljax '
        'variables or a jackpot (WORKDIR/jackpot.npz: masked weights, batch_stats, mask) back '
        'to a PyTorch state_dict.',
    )
    parser.add_argument('src', help='PyTorch checkpoint, or an ljax .npz when exporting')
    parser.add_argument(
        'dst', help='output .npz (keys like params/conv1/kernel), or .pth/.safetensors'
    )
    parser.add_argument('--arch', required=True, choices=ARCHS)
    parser.add_argument('--force', action='store_true', help='overwrite DST if it exists')
    args = parser.parse_args(argv)

    dst = Path(args.dst)
    if dst.suffix not in ('.npz',) + _EXPORT_SUFFIXES:
        parser.error(
            f'DST must end in .npz (import) or {"/".join(_EXPORT_SUFFIXES)} (export): {dst}'
        )
    if dst.exists() and not args.force:
        parser.error(f'{dst} exists; pass --force to overwrite it')
    if not dst.parent.is_dir():
        parser.error(f'no such directory: {dst.parent}')
    if dst.suffix in _EXPORT_SUFFIXES:
        try:
            count = export_torch(args.src, dst, args.arch)
        except Exception as error:  # bad input: one line, no traceback
            parser.error(' '.join(str(error).split()) or type(error).__name__)
        print(f'wrote {dst}: {args.arch} state_dict, {count:,} tensors')
        return 0
    try:
        variables = from_torch(args.src, args.arch)
        save_variables_npz(variables, dst)
    except Exception as error:  # bad input: one line, no traceback
        message = ' '.join(str(error).split()) or type(error).__name__
        parser.error(message)
    config = infer_model_config(variables, args.arch)
    count = sum(int(v.size) for v in _flatten(variables['params']).values())
    print(f'wrote {dst}: {_describe(args.arch, config)}, {count:,} params')
    return 0


if __name__ == '__main__':
    sys.exit(main())
