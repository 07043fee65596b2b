// Whole-page copies by row for HostSwap's staging buffer (kernels/swap_copy.py compiles this
// file through CuPy's NVRTC; see its docstring).
template <typename T>
__device__ __forceinline__ void copy_rows(const T* __restrict__ src, T* __restrict__ dst,
                                          const long long* __restrict__ src_rows,
                                          const long long* __restrict__ dst_rows,
                                          long long num_pages, long long words, long long per_block) {
    // Block (x, y): pages x, x + gridDim.x, ...; words [y * per_block, (y + 1) * per_block) of each.
    __shared__ long long rows[2];
    for (long long p = blockIdx.x; p < num_pages; p += gridDim.x) {     // same trip count block-wide
        if (threadIdx.x == 0) {
            rows[0] = src_rows ? src_rows[p] : p;
            rows[1] = dst_rows ? dst_rows[p] : p;
        }
        __syncthreads();                      // rows[] written before any thread reads them
        const T* s = src + rows[0] * words;
        T* d = dst + rows[1] * words;
        const long long end = (blockIdx.y + 1LL) * per_block, hi = end < words ? end : words;
        for (long long w = (long long)blockIdx.y * per_block + threadIdx.x; w < hi; w += blockDim.x)
            d[w] = s[w];
        __syncthreads();                      // every thread has read rows[] before the next page
    }
}
#define PAGEMEM_COPY_ROWS(BYTES, T) \
extern "C" __global__ void pagemem_copy_rows_##BYTES(const T* src, T* dst, const long long* src_rows, \
        const long long* dst_rows, long long num_pages, long long words, long long per_block) { \
    copy_rows(src, dst, src_rows, dst_rows, num_pages, words, per_block); \
}
PAGEMEM_COPY_ROWS(16, ulonglong2)
PAGEMEM_COPY_ROWS(8, unsigned long long)
PAGEMEM_COPY_ROWS(4, unsigned int)
PAGEMEM_COPY_ROWS(2, unsigned short)
PAGEMEM_COPY_ROWS(1, unsigned char)
