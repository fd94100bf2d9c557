"""VGG-19 (the authors' 16-conv CIFAR layout) on CIFAR10: 90% sparsity, 30 epochs, batch 256,
lr 0.1 cosine, weight decay 5e-4, from the authors' dense checkpoint (or a .npz of ours).

python main.py --config configs/vgg19_cifar10.py --config.pretrained=vgg19_cifar10.pt
"""

from ljax.config import base


def get_config():
    c = base()
    c.model = 'vgg19_cifar'
    c.num_classes = 10
    c.dataset = 'cifar10'
    c.pretrained = 'vgg19_cifar10.pt'
    c.sparsity = 0.9
    c.epochs = 30
    c.batch_size = 256
    c.eval_batch_size = 500
    c.lr = 0.1
    c.weight_decay = 5e-4
    return c
