"""Training: data (tokenize, pack, cached shards), the `Trainer` loop (accumulation, bf16 autocast,
atomic checkpoints and exact resume, torchrun DDP/FSDP2), metrics, and the hooks training methods use.

    from effllm.train import TrainConfig, train
    train(TrainConfig(model="ckpt", data=["corpus/"], out="run", steps=1000, seq_len=512))
"""

from effllm.train.config import TrainConfig
from effllm.train.methods import register_method
from effllm.train.trainer import StepResult, Trainer, train, train_step

__all__ = ["StepResult", "TrainConfig", "Trainer", "register_method", "train", "train_step"]
