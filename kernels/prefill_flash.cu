// The fused paged prefill kernel (kernels/prefill_flash.py loads this file and prepends the
// #defines of one head_dim, tiling and element type; see its docstring for the layout).
#define HD HEAD_DIM
#define WR (16 * MT)            /* query rows a warp */
#define BM (WR * NWARPS)
#define BN BLOCK_N
#define SN SUB_N               /* keys a warp scores at a time (one online-softmax step) */
#define DP (HD + 8)            /* padded smem row (halves): ldmatrix rows fall in distinct banks */
#define NEG_INF __int_as_float(0xff800000)

typedef unsigned short u16;
typedef unsigned int u32;

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
    // src_bytes 0 fills the 16 bytes with zeros (padding keys, rows past the query)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_wait_stages() { asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 2)); }
__device__ __forceinline__ void ldsm4(u32 a, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
}
__device__ __forceinline__ void ldsm4_t(u32 a, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
}
__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32." ELEM "." ELEM ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma16816_zc(float* c, const u32* a, u32 b0, u32 b1) {   // c = a b
    asm("mma.sync.aligned.m16n8k16.row.col.f32." ELEM "." ELEM ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"
        : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
}
__device__ __forceinline__ u32 pack2(float lo, float hi) {   // lo -> low half (the lower column)
    u32 r;
    asm("cvt.rn." ELEM "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

extern "C" __global__ void __launch_bounds__(NWARPS * 32, MINB)
pagemem_flash_prefill(const u16* __restrict__ q, long long q_tok, long long q_head,
                      const u16* __restrict__ kc, const u16* __restrict__ vc,
                      long long c_page, long long c_tok, long long c_head,
                      const int* __restrict__ page_tables, long long pt_stride,
                      const int* __restrict__ context_lens, const int* __restrict__ qsl,
                      u16* __restrict__ out, long long o_tok, long long o_head,
                      int group, int page_shift, float scale_log2, int window, int num_tiles) {
    // q, out: [num_tokens, num_q_heads, HD], strides in elements; kc, vc: pages [.., P, Hkv, HD].
    // Block rows: with PACK, row r is head kvh * group + r % group of token r / group (a KV
    // head's whole query group shares each K/V tile); without, row r is token r of head blockIdx.y.
    // Warp w owns rows [w * WR, w * WR + WR), as MT m-tiles of 16 rows.
    extern __shared__ __align__(16) u16 smem[];
    u16* sq = smem;                    // [BM][DP]
    u16* sk = sq + BM * DP;            // [STAGES][BN][DP]
    u16* sv = sk + STAGES * BN * DP;   // [STAGES][BN][DP]
    // Shared addresses as 32-bit byte offsets, computed once: each ldmatrix below is a base
    // register plus a compile-time offset.
    const u32 sq_base = smem_u32(sq), sk_base = smem_u32(sk), sv_base = smem_u32(sv);
    constexpr int CH = HD / 8;         // 16-byte chunks a row
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int s = blockIdx.x / num_tiles;
    const int tile = num_tiles - 1 - (blockIdx.x - s * num_tiles);
    const int GP = PACK ? group : 1;                  // rows a token
    const int TB = BM / GP;                           // tokens a block
    const int kvh = PACK ? blockIdx.y : blockIdx.y / group;
    const int h0 = PACK ? kvh * group : blockIdx.y;   // head of row r: h0 + r % GP
    const int q0 = qsl[s];
    const int qlen = qsl[s + 1] - q0;
    const int m0 = tile * TB;                         // the block's first token
    if (m0 >= qlen) return;
    const int pos0 = context_lens[s] - qlen;          // position of token 0
    const int rows = min(TB, qlen - m0) * GP;         // valid rows
    const int kend = pos0 + m0 + rows / GP;           // keys [kbeg, kend)
    int kbeg = window > 0 ? max(0, pos0 + m0 - window + 1) : 0;
    kbeg &= ~(BN - 1);
    const int* pt = page_tables + s * pt_stride;
    const int pmask = (1 << page_shift) - 1;

    for (int i = tid; i < BM * CH; i += NWARPS * 32) {
        const int r = i / CH, c = i - r * CH;
        const u16* src = q;
        int n = 0;
        if (r < rows) {
            src = q + (long long)(q0 + m0 + r / GP) * q_tok + (long long)(h0 + r % GP) * q_head + c * 8;
            n = 16;
        }
        cp_async16(sq_base + 2u * (r * DP + c * 8), src, n);
    }
    auto load_kv = [&](int buf, int k0) {
        for (int i = tid; i < BN * CH; i += NWARPS * 32) {
            const int r = i / CH, c = i - r * CH, key = k0 + r;
            const u16* ks = kc;
            const u16* vs = vc;
            int n = 0;
            if (key < kend) {
                const long long off = (long long)pt[key >> page_shift] * c_page
                    + (long long)(key & pmask) * c_tok + (long long)kvh * c_head + c * 8;
                ks = kc + off;
                vs = vc + off;
                n = 16;
            }
            const u32 off = 2u * ((buf * BN + r) * DP + c * 8);
            cp_async16(sk_base + off, ks, n);
            cp_async16(sv_base + off, vs, n);
        }
    };
    const int nkv = (kend - kbeg + BN - 1) / BN;
    // Tiles in flight: STAGES - 1 ahead of the one computed. Group 0 holds the Q tile too.
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
        if (i < nkv) load_kv(i, kbeg + i * BN);
        cp_commit();
    }

    const int g = lane >> 2, t = lane & 3;
    const int wlo = pos0 + m0 + (w * WR) / GP;        // positions of the warp's first and last rows
    const int whi = pos0 + m0 + (w * WR + WR - 1) / GP;
    int rpos[MT][2];                                  // positions of this thread's rows
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        rpos[mt][0] = pos0 + m0 + (w * WR + mt * 16 + g) / GP;
        rpos[mt][1] = pos0 + m0 + (w * WR + mt * 16 + g + 8) / GP;
    }
    // ldmatrix row addresses of this lane: A tiles (rows, cols) and B tiles (keys, dims)
    const int a_row = (lane & 7) + (((lane >> 3) & 1) << 3), a_col = (lane >> 4) << 3;
    const u32 q_addr = sq_base + 2u * ((w * WR + a_row) * DP + a_col);
    const u32 k_lane = 2u * (((lane & 7) + ((lane >> 4) << 3)) * DP + (((lane >> 3) & 1) << 3));
    const u32 v_lane = 2u * (a_row * DP + a_col);
#if Q_REGS
    u32 qf[MT][HD / 16][4];
#endif
    float o[MT][HD / 8][4];
    float mrow[MT][2], lrow[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int i = 0; i < HD / 8; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
        mrow[mt][0] = mrow[mt][1] = NEG_INF;
        lrow[mt][0] = lrow[mt][1] = 0.f;
    }
    for (int it = 0; it < nkv; ++it) {
        const int buf = it % STAGES;
        cp_wait_stages();                             // tile it (and Q) have landed ...
        __syncthreads();                              // ... for every thread, and tile it - 1 is done
        if (it + STAGES - 1 < nkv) load_kv((it + STAGES - 1) % STAGES, kbeg + (it + STAGES - 1) * BN);
        cp_commit();                                  // (an empty group past the end keeps the count)
#if Q_REGS
        if (it == 0) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int ks = 0; ks < HD / 16; ++ks)
                    ldsm4(q_addr + 2u * (mt * 16 * DP + ks * 16), qf[mt][ks][0], qf[mt][ks][1], qf[mt][ks][2], qf[mt][ks][3]);
        }
#endif
#pragma unroll 1
        for (int sub = 0; sub < BN / SN; ++sub) {     // SN keys of the tile at a time
        const int k0 = kbeg + it * BN + sub * SN;     // first key of the sub-tile
        const u32 k_addr = sk_base + 2u * (buf * BN + sub * SN) * DP + k_lane;   // its rows in shared memory
        const u32 v_addr = sv_base + 2u * (buf * BN + sub * SN) * DP + v_lane;
        // Skip keys none of the warp's rows may see (past the diagonal, or before the window).
        const bool active = k0 <= whi && (window == 0 || k0 + SN - 1 > wlo - window);
        if (active) {
            float sc[MT][SN / 8][4];
#pragma unroll
            for (int ks = 0; ks < HD / 16; ++ks) {
#if Q_REGS
#define QA(mt) qf[mt][ks]
#else
                u32 qa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
                    ldsm4(q_addr + 2u * (mt * 16 * DP + ks * 16), qa[mt][0], qa[mt][1], qa[mt][2], qa[mt][3]);
#define QA(mt) qa[mt]
#endif
#pragma unroll
                for (int np = 0; np < SN / 16; ++np) {
                    u32 b0, b1, b2, b3;
                    ldsm4(k_addr + 2u * (np * 16 * DP + ks * 16), b0, b1, b2, b3);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        if (ks == 0) {                // the first k-step starts from zero
                            mma16816_zc(sc[mt][2 * np], QA(mt), b0, b1);
                            mma16816_zc(sc[mt][2 * np + 1], QA(mt), b2, b3);
                        } else {
                            mma16816(sc[mt][2 * np], QA(mt), b0, b1);
                            mma16816(sc[mt][2 * np + 1], QA(mt), b2, b3);
                        }
                    }
                }
#undef QA
            }
            if (k0 + SN - 1 > wlo || window > 0) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int nt = 0; nt < SN / 8; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int key = k0 + nt * 8 + 2 * t + (e & 1);
                            const int pos = rpos[mt][e >> 1];
                            if (key > pos || (window > 0 && pos - key >= window)) sc[mt][nt][e] = NEG_INF;
                        }
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {             // online softmax of rows g (r=0) and g+8 (r=1)
                float mx = NEG_INF;
#pragma unroll
                for (int nt = 0; nt < SN / 8; ++nt) mx = fmaxf(mx, fmaxf(sc[mt][nt][2 * r], sc[mt][nt][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float mnew = fmaxf(mrow[mt][r], mx * scale_log2);
                const float ms = mnew == NEG_INF ? 0.f : mnew;   // no key yet: keep p = alpha = 0
                const float alpha = fast_exp2(mrow[mt][r] - ms);
                mrow[mt][r] = mnew;
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < SN / 8; ++nt) {
#pragma unroll
                    for (int e = 2 * r; e < 2 * r + 2; ++e) {
                        const float p = fast_exp2(fmaf(sc[mt][nt][e], scale_log2, -ms));
                        sc[mt][nt][e] = p;
                        sum += p;
                    }
                }
                lrow[mt][r] = lrow[mt][r] * alpha + sum;   // this thread's share; summed at the end
#pragma unroll
                for (int i = 0; i < HD / 8; ++i) {
                    o[mt][i][2 * r] *= alpha;
                    o[mt][i][2 * r + 1] *= alpha;
                }
            }
#pragma unroll
            for (int kk = 0; kk < SN / 16; ++kk) {    // O += P V, P straight from the score registers
                u32 a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    a[mt][0] = pack2(sc[mt][2 * kk][0], sc[mt][2 * kk][1]);
                    a[mt][1] = pack2(sc[mt][2 * kk][2], sc[mt][2 * kk][3]);
                    a[mt][2] = pack2(sc[mt][2 * kk + 1][0], sc[mt][2 * kk + 1][1]);
                    a[mt][3] = pack2(sc[mt][2 * kk + 1][2], sc[mt][2 * kk + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < HD / 16; ++dp) {
                    u32 b0, b1, b2, b3;
                    ldsm4_t(v_addr + 2u * (kk * 16 * DP + dp * 16), b0, b1, b2, b3);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma16816(o[mt][2 * dp], a[mt], b0, b1);
                        mma16816(o[mt][2 * dp + 1], a[mt], b2, b3);
                    }
                }
            }
        }
        }
    }

#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = lrow[mt][r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = 1.f / l;
        const int row = w * WR + mt * 16 + g + 8 * r;
        if (row < rows) {
            u16* dst = out + (long long)(q0 + m0 + row / GP) * o_tok + (long long)(h0 + row % GP) * o_head + 2 * t;
#pragma unroll
            for (int i = 0; i < HD / 8; ++i)
                *reinterpret_cast<u32*>(dst + i * 8) = pack2(o[mt][i][2 * r] * inv, o[mt][i][2 * r + 1] * inv);
        }
    }
}
