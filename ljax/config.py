"""Every field a config may set, with its default. Config files start from `base()` and override.

Sparsity is the fraction of prunable weights *removed* (0.9 keeps 10%).
"""

import ml_collections


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = 'search'  # 'search' | 'pretrain' | 'evaluate'
    # model and data
    c.model = 'mlp'  # ljax.models.get_model name
    c.model_kwargs = ml_collections.ConfigDict()
    c.num_classes = 10
    c.dataset = 'fashion_mnist'  # 'fashion_mnist' | 'cifar10' | 'cifar100' | 'imagenet2012'
    c.data_dir = ml_collections.config_dict.placeholder(str)
    c.image_size = ml_collections.config_dict.placeholder(int)
    c.train_examples = ml_collections.config_dict.placeholder(int)  # a subset, for quick runs
    c.eval_examples = ml_collections.config_dict.placeholder(int)
    c.sync_bn = True  # BatchNorm statistics over the global batch (axis 'batch'), as on 1 device
    # multi-host: run the same command on every host with these three, or distributed=True alone
    # to let JAX detect the cluster (SLURM, Open MPI, Cloud TPU)
    c.coordinator_address = ml_collections.config_dict.placeholder(str)  # 'HOST:PORT' of process 0
    c.num_processes = ml_collections.config_dict.placeholder(int)
    c.process_id = ml_collections.config_dict.placeholder(int)
    c.distributed = False
    # the search (the paper's hyper-parameter table)
    c.pretrained = ''  # .npz of ljax variables, or a PyTorch .pth/.pt/.safetensors
    c.sparsity = 0.9
    c.epochs = 30
    c.batch_size = 256  # global, split across the local devices
    c.eval_batch_size = 500
    c.bn_batches = 50  # train batches that re-estimate BN statistics for the one-shot baseline
    c.lr = 0.1  # cosine decay over the whole search
    c.momentum = 0.9
    c.weight_decay = 5e-4  # coupled, on the scores
    c.score_init = 'magnitude'  # 'magnitude' | 'random' | 'wanda'
    c.score_margin = 0.01  # magnitude init: kept 1.0, pruned 1.0 - margin
    c.allocation = 'global_magnitude'  # 'global_magnitude' | 'uniform' | 'erk'
    c.nm = ''  # 'N:M' (e.g. '2:4'): N of every M weights along each kernel's input axis; sparsity 1-N/M
    c.calibration_batches = 8  # train batches for Wanda's input norms (score_init and baseline)
    c.restriction = 'none'  # 'none' | 'cosine' | 'poly4' | 'linear' | 'constant:R'
    c.seed = 0
    c.dtype = 'float32'  # 'float32' | 'bfloat16': forward/backward; scores, BN statistics stay f32
    # dense pretraining (mode='pretrain')
    c.pretrain_epochs = 10
    c.pretrain_lr = 0.1
    c.pretrain_weight_decay = 5e-4
    # evaluation of an exported jackpot (mode='evaluate'); default: WORKDIR/jackpot.npz
    c.jackpot = ''
    # bookkeeping
    c.checkpoint_every_steps = 500
    c.log_every_steps = 50
    c.max_to_keep = 2
    c.progress = True
    return c
