"""Several passes, or several contexts, stepped together so their passes share executor steps."""
from wit_world.imports import forward, model

from pie_sdk.runtime import unwrap
from pie_sdk.samplers import greedy


def wait_all(handles) -> list:
    """Wait for several passes at once (of one context or many, from submit_step); per handle, in
    order, its outputs' values: a token, (token, log-probability), a distribution's (ids, probs)."""
    return [[o.value for o in outputs] for outputs in unwrap(forward.wait_all, list(handles))]


def generate_together(contexts, max_tokens: int, samplers=None, stop_tokens=None) -> list:
    """Generate from several contexts at once, each with its own sampler (default greedy): every
    round submits one pass per unfinished context, so they all go to the executor in one step.
    Returns each context's text; a stop token ends a context's text and is not part of it."""
    samplers = [greedy()] * len(contexts) if samplers is None else list(samplers)
    stops = (contexts[0].stop_tokens if contexts else set()) if stop_tokens is None else set(stop_tokens)
    generated = [[] for _ in contexts]
    live = list(range(len(contexts)))
    for _ in range(max_tokens):
        if not live:
            break
        handles = [contexts[i].submit_step(samplers[i]) for i in live]
        for i, outputs in zip(list(live), wait_all(handles)):
            token = outputs[0]
            if token in stops:
                live.remove(i)
            else:
                generated[i].append(token)
                contexts[i].fill_tokens([token])
    return [unwrap(model.decode, tokens) for tokens in generated]
