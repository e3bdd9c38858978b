"""Weight-only quantized linear layers for the CPU (issue 19).

Two block formats, both llama.cpp's (GGUF) so a GGUF file's blocks load as they are:
- Q8_0 ("int8"): blocks of 32 int8 values with one scale; w = q * d.
- Q4_1 ("int4"): blocks of 32 4-bit values with a scale and a minimum; w = q * d + m.
Activations stay fp32 (bf16 inputs are widened); the kernels (kernels.cpp, AVX2 where the
CPU has it) unpack each block in registers and multiply in fp32, so the weights a matmul
sees are exactly the dequantized blocks.
"""
