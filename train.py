"""Train the running model on one JSONL file, continuing from its latest checkpoint.

    python train.py --dataset data.jsonl
    python train.py --dataset data.jsonl --output_dir current_model --status_dir status \
        --per_device_train_batch_size 8 --gradient_accumulation_steps 2 --max_seq_length 256
    python train.py --config train.yaml --dataset data.jsonl
    torchrun --nproc_per_node 2 train.py --dataset data.jsonl
    python train.py --help

All logic lives in daemon/ (the run: daemon/training/run.py); this is the same code path the daemon's child runs.
"""

import sys

from daemon.__main__ import exit_process, main

if __name__ == "__main__":
    exit_process(main(["train", *sys.argv[1:]]))
