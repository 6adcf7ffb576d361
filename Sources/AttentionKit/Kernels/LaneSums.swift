#if ATTN_AVX512 && arch(x86_64)
  import _Builtin_intrinsics.intel

  /// The lane sums of sixteen vectors at once, as one vector: lane `i` of the result is
  /// `Σ_l v_i[l]` — sixteen horizontal sums in 30 permutes and 15 additions, where one at a
  /// time takes about eight shuffles and additions each, and a scalar store.
  ///
  /// A tree of four levels, each pairing two vectors `x`, `y` into `gather(x, y, A) + gather(x, y,
  /// B)` (AVX-512's two-source permute, `vpermt2ps`): level 1 folds each vector's sixteen
  /// partial sums to eight (`x`'s in lanes 0–7, `y`'s in 8–15), level 2 to four, level 3 to two,
  /// level 4 to one; the results stay in input order. Written with the intrinsics because the
  /// compiler turns the same shuffles spelled lane by lane into scalar code.
  ///
  /// Only with `-DATTN_AVX512` (`Scripts/build-flags.sh` on a CPU with AVX-512F).
  enum LaneSums {
    typealias Sixteen = SIMD16<Float>

    @inline(__always)
    static func sixteen(
      _ v0: Sixteen, _ v1: Sixteen, _ v2: Sixteen, _ v3: Sixteen, _ v4: Sixteen, _ v5: Sixteen,
      _ v6: Sixteen, _ v7: Sixteen, _ v8: Sixteen, _ v9: Sixteen, _ v10: Sixteen,
      _ v11: Sixteen, _ v12: Sixteen, _ v13: Sixteen, _ v14: Sixteen, _ v15: Sixteen
    ) -> Sixteen {
      // Lane indices into the pair (x: 0–15, y: 16–31); B is A shifted by the level's half group.
      let halves = SIMD16<Int32>(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
      let quarters = SIMD16<Int32>(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
      let pairs = SIMD16<Int32>(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
      let singles = SIMD16<Int32>(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
      @inline(__always)
      func fold(_ x: Sixteen, _ y: Sixteen, _ a: SIMD16<Int32>, by shift: Int32) -> Sixteen {
        let (first, second) = (
          unsafeBitCast(a, to: __m512i.self), unsafeBitCast(a &+ shift, to: __m512i.self)
        )
        return _mm512_add_ps(
          _mm512_permutex2var_ps(x, first, y), _mm512_permutex2var_ps(x, second, y))
      }
      let h0 = fold(v0, v1, halves, by: 8)
      let h1 = fold(v2, v3, halves, by: 8)
      let h2 = fold(v4, v5, halves, by: 8)
      let h3 = fold(v6, v7, halves, by: 8)
      let h4 = fold(v8, v9, halves, by: 8)
      let h5 = fold(v10, v11, halves, by: 8)
      let h6 = fold(v12, v13, halves, by: 8)
      let h7 = fold(v14, v15, halves, by: 8)
      let q0 = fold(h0, h1, quarters, by: 4)
      let q1 = fold(h2, h3, quarters, by: 4)
      let q2 = fold(h4, h5, quarters, by: 4)
      let q3 = fold(h6, h7, quarters, by: 4)
      let p0 = fold(q0, q1, pairs, by: 2)
      let p1 = fold(q2, q3, pairs, by: 2)
      return fold(p0, p1, singles, by: 1)
    }
  }
#endif
