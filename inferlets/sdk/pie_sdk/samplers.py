"""Samplers for output positions, as the forward interface takes them."""
from wit_world.imports import forward


def greedy():
    return forward.Sampler_Greedy()


def sample(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed=None):
    return forward.Sampler_Sample(forward.SampleParams(temperature, top_k, top_p, min_p, seed))


def distribution(k: int, temperature: float = 1.0):
    return forward.Sampler_Distribution((k, temperature))


def logprobs(tokens: list[int]):
    return forward.Sampler_Logprobs(list(tokens))
