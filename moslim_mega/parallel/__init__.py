"""PyTorch-native distributed backend (issue 6): a DeviceMesh from ``parallel.*``, tensor
parallel plans and FSDP2 applied from outside the model files, vocab-parallel log-probs, grad
clipping across DTensors, and a meta-device memory planner (``moslim plan``).

Everything here runs on CPU with gloo (tests, 2 processes) and on GPUs with NCCL unchanged.
"""
