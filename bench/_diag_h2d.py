import time, numpy as np, cupy as cp
s = cp.cuda.Stream(non_blocking=True)
a = cp.random.random((8192, 8192), dtype=cp.float32)
with s:
    for size in (1000, 40000, 400000):
        x = np.arange(size, dtype=np.int32)
        for trial in range(3):
            s.synchronize()
            for _ in range(20):
                a @ a                                  # ~20 x 1 ms of work queued
            t0 = time.perf_counter(); y = cp.asarray(x); t1 = time.perf_counter()
            z = cp.empty(size, dtype=cp.int32); t2 = time.perf_counter(); z.set(x, stream=s); t3 = time.perf_counter()
            q = cp.asarray(x[::2]); t4 = time.perf_counter()
            s.synchronize(); t5 = time.perf_counter()
            print(f"size {size}: asarray {1e3*(t1-t0):.2f} ms, set(pageable) {1e3*(t3-t2):.2f} ms, asarray(strided) {1e3*(t4-t3):.2f} ms, rest of queue {1e3*(t5-t4):.2f} ms")
