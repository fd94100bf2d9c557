"""VGG-19 (the authors' 16-conv CIFAR layout) on CIFAR100: 90% sparsity, 30 epochs, batch 256,
lr 0.1 cosine, weight decay 5e-4, from the authors' dense checkpoint (or a .npz of ours).

python main.py --config configs/vgg19_cifar100.py --config.pretrained=vgg19_cifar100.pt
"""

from ljax.config import base


def get_config():
    c = base()
    c.model = 'vgg19_cifar'
    c.num_classes = 100
    c.dataset = 'cifar100'
    c.pretrained = 'vgg19_cifar100.pt'
    c.sparsity = 0.9
    c.epochs = 30
    c.batch_size = 256
    c.eval_batch_size = 500
    c.lr = 0.1
    c.weight_decay = 5e-4
    return c
