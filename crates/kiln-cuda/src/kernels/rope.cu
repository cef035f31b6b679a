// Rotary position embedding, in place.
//
// Each pair (a, b) of a head is rotated by the angle θ of its frequency at the token's
// position:  a' = a·cos θ − b·sin θ,  b' = b·cos θ + a·sin θ.
// Backward is the inverse rotation (sign = −1: θ → −θ), since the map is orthogonal.
// Pairs are (i, i + rot/2) (half-split, Llama) or (2i, 2i + 1) (interleaved, DeepSeek),
// counted from the head's feature `offset`. `table` holds rot/2 cosines then rot/2 sines per
// position; a position beyond its `table_rows` rows gives NaN.
extern "C" __global__ void rope(float* x, const float* table, const int* positions, long tokens, long heads,
                                long head_dim, long rot_dim, long offset, int interleaved, long table_rows,
                                float sign) {
    const long half = rot_dim / 2;
    FOR_EACH(idx, tokens * heads * half) {
        const long i = idx % half, th = idx / half, t = th / heads;
        float* head = x + th * head_dim + offset;
        const long ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
        const int pos = positions[t];
        float c = QNAN, s = QNAN;
        if (pos >= 0 && pos < table_rows) {
            c = table[(long)pos * rot_dim + i];
            s = sign * table[(long)pos * rot_dim + half + i];
        }
        const float a = head[ia], b = head[ib];
        head[ia] = a * c - b * s;
        head[ib] = b * c + a * s;
    }
}
