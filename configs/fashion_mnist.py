"""Offline default: a 90%-sparse jackpot of the shipped dense BN-MLP 784-768-768-10 on Fashion-MNIST.

python main.py --config configs/fashion_mnist.py
Re-create the shipped model: python main.py --config configs/fashion_mnist.py --config.mode=pretrain
  --workdir runs/fashion_mnist_pretrain  (then copy runs/.../pretrained.npz to pretrained/)
"""

import os

from ljax.config import base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
    c = base()
    c.model = 'mlp'
    c.model_kwargs.hidden = (768, 768)
    c.dataset = 'fashion_mnist'
    c.num_classes = 10
    c.pretrained = os.path.join(REPO, 'pretrained', 'fashion_mnist_mlp.npz')
    c.sparsity = 0.9
    c.epochs = 10
    c.batch_size = 256
    c.eval_batch_size = 1000
    c.lr = 0.1
    c.weight_decay = 5e-4
    c.checkpoint_every_steps = 200
    c.pretrain_epochs = 10
    c.pretrain_lr = 0.05
    return c
