"""Weight-only quantized linear layers for the CPU (issue 19).

Two block formats, both llama.cpp's (GGUF), so a GGUF file's blocks load as they are:
- Q8_0 ("int8"): blocks of 32 int8 values with one fp16 scale; w = q * d.
- Q4_1 ("int4"): blocks of 32 4-bit values with an fp16 scale and minimum; w = q * d + m.
The kernels (kernels.cpp, AVX2 where the CPU has it) unpack blocks in registers. Prefill-sized
calls multiply in fp32, so they see exactly the dequantized weights; decode-sized calls (up to
4 rows) round their activations to 8 bits per block of 32 and use integer dot products, as
llama.cpp does on this path (the LM head excepted: see linear.py). Nothing is stored in 8 bits
between layers: activations, norms, attention and the KV cache keep the model's dtype.
"""
