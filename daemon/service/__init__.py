"""The daemon process: the loop over the inbox, its folders and entries, and the training child it supervises.

Torch-free: nothing here imports torch, transformers or datasets (``tests/test_layout.py``).
"""
