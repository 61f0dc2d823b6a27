// Stack-tape depth indices shared by the pushdown and attachment CPU kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

namespace fastmodels {

// Row of the depth table for S = s: [S > 0] in binary mode, else S clamped to [0, vmax]
// (negative values, unchecked under torch.compile, read row 0).
inline int32_t depth_index(int32_t s, int32_t vmax, bool binary) {
    return binary ? (s > 0) : std::max(0, std::min(s, vmax));
}

// Depth indices of keys 0..t of one query row into idx[0..t]: from a dense int32 row, or from a
// compact tape (depth d, boundary c of the row's sentence) as S(t, j) = d[j] - min_{j<=k<=t} c[k]
// (a reverse running minimum; >= 0 because StackTape checks boundary <= depth).
inline void tape_row(const int32_t* dense_row, const int32_t* d, const int32_t* c, int64_t t, int32_t vmax, bool binary,
                     int32_t* idx) {
    if (dense_row) {
        for (int64_t j = 0; j <= t; ++j) idx[j] = depth_index(dense_row[j], vmax, binary);
        return;
    }
    int32_t running = std::numeric_limits<int32_t>::max();
    for (int64_t j = t; j >= 0; --j) {
        running = std::min(running, c[j]);
        idx[j] = depth_index(d[j] - running, vmax, binary);
    }
}

}  // namespace fastmodels
