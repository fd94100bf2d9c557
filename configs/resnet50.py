"""ResNet-50 on ImageNet (the paper's main result): 90% sparsity, 30 epochs, batch 256,
lr 0.1 cosine, weight decay 1e-4, from torchvision's pre-trained weights.

python main.py --config configs/resnet50.py --config.data_dir=$TFDS_DATA_DIR
"""

from ljax.config import base


def get_config():
    c = base()
    c.model = 'resnet50'
    c.num_classes = 1000
    c.dataset = 'imagenet2012'
    c.image_size = 224
    c.pretrained = 'torchvision://resnet50'  # IMAGENET1K_V1: downloaded, checked, converted, cached
    c.sparsity = 0.9
    c.epochs = 30
    c.batch_size = 256
    c.eval_batch_size = 256  # divides across 8 TPU cores (and 1, 2, 4 GPUs)
    c.lr = 0.1
    c.weight_decay = 1e-4
    c.checkpoint_every_steps = 1000
    return c
