"""Search step vs dense training step, and the mask update alone at ResNet-50 size.

  python benchmarks/step_time.py [--batch 128] [--steps 20] [--skip-resnet50]

Part 1: a BN convnet on 28x28x1 (the same model, batch and optimizer for both) and a dense
training step of it (SGD on the weights) against the jackpot search step (SGD on the scores, STE
forward, exact top-k mask update), both pmapped on one device, median of `--steps` steps after
compilation, interleaved so that machine noise hits both alike. Prints ms/step and the ratio.
Part 2: one mask update (all layers) for a params pytree shaped like ResNet-50 (every conv and
the fc kernel: 25.5M weights, 10% kept): `lax.top_k` per layer + scatter, then our selection
without and with the previous threshold as a hint, and the short restriction at rate 0.5.
"""
import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ljax import masks, restriction
from ljax.search import AXIS_NAME, Parallel, Search, SearchOptions


class ConvNet(nn.Module):
  widths: tuple = (32, 64, 128)

  @nn.compact
  def __call__(self, x, train):
    for w in self.widths:
      x = nn.Conv(w, (3, 3), use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def dense_step_fn(model, tx):
  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      logits, upd = model.apply({'params': p, 'batch_stats': batch_stats}, x, train=True,
                                mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd['batch_stats']
    (loss, bs), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    g = jax.lax.pmean(g, AXIS_NAME)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), jax.lax.pmean(bs, AXIS_NAME), opt_state, loss
  return jax.pmap(step, AXIS_NAME, donate_argnums=(0, 1, 2), devices=jax.local_devices()[:1])


def time_it(fn, steps):
  ts = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def step_times(batch, steps, restriction_name):
  model = ConvNet()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, 28, 28, 1)).astype(np.float32)
  y = rng.integers(0, 10, batch).astype(np.int32)
  v = model.init(jax.random.key(0), x[:1], train=False)
  n_params = sum(a.size for a in jax.tree.leaves(v['params']))

  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  dense = dense_step_fn(model, tx)
  one = jax.local_devices()[:1]
  from flax import jax_utils
  d_state = [jax_utils.replicate(t, one) for t in (v['params'], v['batch_stats'], tx.init(v['params']))]
  xs, ys = x[None], y[None]

  search = Search.create(model, v, x[:1], sparsity=0.9, total_steps=10**6,
                         options=SearchOptions(restriction=restriction_name))
  par = Parallel(search, one)
  s_state = par.replicate(search.init_state())

  def run_dense():
    nonlocal d_state
    p, b, o, loss = dense(*d_state, xs, ys)
    d_state = [p, b, o]
    return loss

  def run_search():
    nonlocal s_state
    s_state, m = par.train(s_state, x, y, 0.5 if restriction_name != 'none' else 1.0)
    return m['loss']

  for _ in range(3):  # compile and warm up
    run_dense(), run_search()
  dense_ts, search_ts = [], []
  for _ in range(steps):
    dense_ts.append(time_it(run_dense, 1))
    search_ts.append(time_it(run_search, 1))
  return n_params, statistics.median(dense_ts), statistics.median(search_ts)


def resnet50_kernel_shapes():
  from ljax.models import get_model
  model = get_model('resnet50', 1000)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
  return [tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(v['params'])
          if 'kernel' in jax.tree_util.keystr(p)]


def mask_update_times(repeats=3):
  shapes = resnet50_kernel_shapes()
  n = sum(int(np.prod(s)) for s in shapes)
  keys = jax.random.split(jax.random.key(0), len(shapes))
  scores = [jax.random.normal(k, s) for k, s in zip(keys, shapes)]
  kept = [max(1, int(np.prod(s)) // 10) for s in shapes]
  moved = [s + 1e-4 * jax.random.normal(k, s.shape) for k, s in zip(keys, scores)]  # one step later

  @jax.jit
  def lax_topk(scores):
    out = []
    for s, k in zip(scores, kept):
      _, idx = jax.lax.top_k(s.reshape(-1), k)
      out.append(jnp.zeros(s.size, bool).at[idx].set(True).reshape(s.shape))
    return out

  @jax.jit
  def ours(scores, hints):
    return [masks.topk_mask_with_threshold(s, k, hint=h) for s, k, h in zip(scores, kept, hints)]

  @jax.jit
  def ours_plain(scores):
    return [masks.topk_mask_with_threshold(s, k) for s, k in zip(scores, kept)]

  first = ours_plain(scores)
  hints = [t for _, t in first]
  prev = [m for m, _ in first]

  @jax.jit
  def restricted(mask, scores, hints):
    return [restriction.restrict_mask_with_threshold(m, s, k, 0.5, hint=h)
            for m, s, k, h in zip(mask, scores, kept, hints)]

  def best(fn):
    jax.block_until_ready(fn())
    return min(time_it(fn, 1) for _ in range(repeats))

  rows = [('lax.top_k per layer + scatter', best(lambda: lax_topk(moved))),
          ('ljax top-k, 32-pass bisection', best(lambda: ours_plain(moved))),
          ('ljax top-k, hint from previous step', best(lambda: ours(moved, hints))),
          ('ljax short restriction (rate 0.5), hint', best(lambda: restricted(prev, moved, hints)))]
  exact = all(bool(jnp.all(a == b[0])) for a, b in zip(lax_topk(moved), ours(moved, hints)))
  return n, len(shapes), rows, exact


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--batch', type=int, default=128)
  ap.add_argument('--steps', type=int, default=20)
  ap.add_argument('--skip-resnet50', action='store_true')
  args = ap.parse_args()
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}, batch {args.batch}, '
        f'median of {args.steps} interleaved steps')
  print(f"{'model':<28}{'params':>10}{'dense ms':>10}{'search ms':>11}{'ratio':>8}")
  for name in ('none', 'poly4'):
    n, d, s = step_times(args.batch, args.steps, name)
    label = 'BN-ConvNet, top-k' if name == 'none' else 'BN-ConvNet, SR rate 0.5'
    print(f'{label:<28}{n:>10,}{d * 1e3:>10.1f}{s * 1e3:>11.1f}{s / d:>8.3f}')
  if not args.skip_resnet50:
    n, layers, rows, exact = mask_update_times()
    print(f'\nmask update, ResNet-50-shaped kernels: {n:,} weights in {layers} layers, 10% kept')
    base = rows[0][1]
    for label, t in rows:
      print(f'{label:<42}{t * 1e3:>9.0f} ms{base / t:>8.1f}x faster than lax.top_k')
    print(f'ljax masks identical to lax.top_k: {exact}')


if __name__ == '__main__':
  main()
