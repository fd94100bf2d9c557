"""ResNet-32 on CIFAR100: 90% sparsity, 30 epochs, batch 256, lr 0.1 cosine, weight decay 5e-4.

Stage widths 16/32/64 are He et al.'s; the authors' released checkpoints use 32/64/128
(--config.model_kwargs.widths='(32, 64, 128)').
python main.py --config configs/resnet32_cifar100.py --config.pretrained=resnet32_cifar100.pt
"""

from ljax.config import base


def get_config():
    c = base()
    c.model = 'resnet32_cifar'
    c.model_kwargs.widths = (16, 32, 64)
    c.num_classes = 100
    c.dataset = 'cifar100'
    c.pretrained = 'resnet32_cifar100.pt'
    c.sparsity = 0.9
    c.epochs = 30
    c.batch_size = 256
    c.eval_batch_size = 500
    c.lr = 0.1
    c.weight_decay = 5e-4
    return c
