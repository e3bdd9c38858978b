"""The vLLM-backed executor: vLLM's model code and attention kernels under our executor contract.

vLLM loads the model and owns the forward pass; we own the pages, the batch and the sampling.
Its KV cache is allocated in vLLM's layout with our page ids as its block ids. Requests vLLM's
attention backend cannot serve (custom attention masks, masked slots) run through a torch path
over the same KV tensors. Needs the `vllm` extra (`make setup-vllm`); nothing here is imported by
the default install.
"""
