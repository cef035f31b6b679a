// Token embedding lookup, its backward, and the rows written into a key/value cache.
// A negative id is a row another rank holds (vocabulary parallel): zeros, no gradient. An id
// beyond the table gives NaN rows (the loss then shows it), not a fault.

// out[t, :] = table[ids[t], :]
extern "C" __global__ void embedding_forward(float* out, const float* table, const int* ids, long tokens, long dim,
                                             long rows) {
    FOR_EACH(i, tokens * dim) {
        const long t = i / dim, c = i % dim;
        const int id = ids[t];
        out[i] = id < 0 ? 0.0f : id < rows ? table[(long)id * dim + c] : QNAN;
    }
}

// dtable[ids[t], :] += dout[t, :]: one thread per column walks the tokens in order, so rows
// repeated in `ids` add up without atomics and in the same order every run.
extern "C" __global__ void embedding_backward(float* dtable, const float* dout, const int* ids, long tokens, long dim,
                                              long rows) {
    FOR_EACH(c, dim) {
        for (long t = 0; t < tokens; t++) {
            const int id = ids[t];
            if (id >= 0 && id < rows) dtable[(long)id * dim + c] += dout[t * dim + c];
        }
    }
}

// dst[rows[t], :] = src[t, :] for rows[t] ≥ 0, stored as f32 ...
extern "C" __global__ void scatter_rows_f32(float* dst, const float* src, const int* rows, long tokens, long dim,
                                            long dst_rows) {
    FOR_EACH(i, tokens * dim) {
        const long t = i / dim, c = i % dim;
        const int r = rows[t];
        if (r >= 0 && r < dst_rows) dst[(long)r * dim + c] = src[i];
    }
}

// ... or as bf16, two values to a word (value 2i in the low half of word i).
extern "C" __global__ void scatter_rows_bf16(bf16_bits* dst, const float* src, const int* rows, long tokens, long dim,
                                             long dst_rows) {
    FOR_EACH(i, tokens * dim) {
        const long t = i / dim, c = i % dim;
        const int r = rows[t];
        if (r >= 0 && r < dst_rows) dst[(long)r * dim + c] = bf16_round(src[i]);
    }
}
