/* The vector type of the fused C kernels (fused.c, sampling.c): WIDTH doubles, as wide as the
 * CPU they are built for (-march=native) takes; WIDTH 1 without AVX. */
#ifndef NTK_SIMD_H
#define NTK_SIMD_H
#if defined(__AVX512F__)
typedef double vec __attribute__((vector_size(64)));
#define WIDTH 8
#elif defined(__AVX__)
typedef double vec __attribute__((vector_size(32)));
#define WIDTH 4
#else
typedef double vec;
#define WIDTH 1
#endif
#endif
