import CBLAS
import Tensors

/// A typed front to OpenBLAS's `cblas_sgemm`, row-major throughout.
///
/// Every matrix product of the kernels (QKᵀ, weights·V, the projections, R = Q·Eᵀ) goes through here,
/// so OpenBLAS does the O(n²·d) work and Swift loops do only the O(n²) element-wise passes.
public enum BLAS {
  /// `C[m×n] = alpha · op(A) · op(B) + beta · C`, all row-major.
  ///
  /// `op(A)` is `m×k` (stored `k×m` when `transposeA`), `op(B)` is `k×n` (stored `n×k` when
  /// `transposeB`); `lda`, `ldb`, `ldc` are the row strides of the stored matrices.
  @inline(__always)
  public static func sgemm(
    transposeA: Bool = false, transposeB: Bool = false,
    m: Int, n: Int, k: Int, alpha: Float = 1,
    a: UnsafePointer<Float>, lda: Int,
    b: UnsafePointer<Float>, ldb: Int,
    beta: Float = 0,
    c: UnsafeMutablePointer<Float>, ldc: Int
  ) {
    cblas_sgemm(
      CblasRowMajor,
      transposeA ? CblasTrans : CblasNoTrans,
      transposeB ? CblasTrans : CblasNoTrans,
      blasInt(m), blasInt(n), blasInt(k), alpha,
      a, blasInt(lda), b, blasInt(ldb), beta, c, blasInt(ldc))
  }

  /// `B = Aᵀ`: `source` is `rows×cols` row-major with row stride `lda`, `destination` becomes
  /// `cols×rows` with row stride `ldb` (OpenBLAS's `somatcopy`, an exact copy).
  @inline(__always)
  public static func transpose(
    rows: Int, cols: Int, _ source: UnsafePointer<Float>, lda: Int,
    into destination: UnsafeMutablePointer<Float>, ldb: Int
  ) {
    cblas_somatcopy(
      CblasRowMajor, CblasTrans, blasInt(rows), blasInt(cols), 1, source, blasInt(lda),
      destination, blasInt(ldb))
  }

  /// `y[m] = alpha · A[m×n] · x[n] + beta · y`, `A` row-major with row stride `lda`.
  ///
  /// A product with one row (a decoder's single token through a projection) is a matrix–vector
  /// product; as an sgemm, OpenBLAS 0.3.21 would first pack the whole weight matrix.
  @inline(__always)
  public static func sgemv(
    m: Int, n: Int, alpha: Float = 1, a: UnsafePointer<Float>, lda: Int,
    x: UnsafePointer<Float>, beta: Float = 0, y: UnsafeMutablePointer<Float>
  ) {
    cblas_sgemv(
      CblasRowMajor, CblasNoTrans, blasInt(m), blasInt(n), alpha, a, blasInt(lda), x, 1, beta,
      y, 1)
  }

  /// The number of threads OpenBLAS uses inside one call.
  public static var threadCount: Int {
    get { Int(openblas_get_num_threads()) }
    set { openblas_set_num_threads(Int32(max(1, newValue))) }
  }

  /// The largest dimension or leading stride OpenBLAS's 32-bit interface accepts.
  public static let maxDimension = Int(Int32.max)

  /// Throws when a matrix dimension does not fit OpenBLAS's 32-bit integers.
  static func checkDimensions(_ dims: Int..., context: String) throws {
    for d in dims where d > maxDimension {
      throw AttentionError.invalidArgument(
        "\(context): dimension \(d) exceeds OpenBLAS's 32-bit limit \(maxDimension)")
    }
  }

  @inline(__always)
  private static func blasInt(_ value: Int) -> Int32 { Int32(truncatingIfNeeded: value) }
}

extension Tensor {
  /// Batched matrix product over equal leading dimensions: `[…, M, K] · […, K, N] → […, M, N]`,
  /// or `[…, M, K] · […, N, K]ᵀ` when `transposeRight` (the QKᵀ form). One sgemm per matrix pair.
  public func matmul(_ right: Tensor, transposeRight: Bool = false, alpha: Float = 1) throws
    -> Tensor
  {
    guard rank >= 2, right.rank >= 2, batchShape == right.batchShape else {
      throw AttentionError.shapeMismatch(
        "cannot multiply \(shapeForMessage(shape)) by \(shapeForMessage(right.shape))\(transposeRight ? "ᵀ" : ""): "
          + "both need rank ≥ 2 and equal leading dimensions")
    }
    let m = shape[rank - 2]
    let k = shape[rank - 1]
    let n = transposeRight ? right.shape[right.rank - 2] : right.shape[right.rank - 1]
    let rightK = transposeRight ? right.shape[right.rank - 1] : right.shape[right.rank - 2]
    guard k == rightK else {
      throw AttentionError.shapeMismatch(
        "inner dimensions differ: \(shapeForMessage(shape)) · \(shapeForMessage(right.shape))\(transposeRight ? "ᵀ" : "")"
      )
    }
    try BLAS.checkDimensions(m, n, k, context: "matmul")
    var result = try Tensor(shape: batchShape + [m, n])
    let batches = batchCount
    if m == 0 || n == 0 { return result }
    scalars.withUnsafeBufferPointer { a in
      right.scalars.withUnsafeBufferPointer { b in
        result.scalars.withUnsafeMutableBufferPointer { c in
          for index in 0..<batches {
            if k == 0 { continue }
            BLAS.sgemm(
              transposeB: transposeRight, m: m, n: n, k: k, alpha: alpha,
              a: a.baseAddress! + index * m * k, lda: k,
              b: b.baseAddress! + index * n * k, ldb: transposeRight ? k : n,
              c: c.baseAddress! + index * m * n, ldc: n)
          }
        }
      }
    }
    return result
  }
}

extension BLAS {
  /// The name of the kernel family OpenBLAS chose for this CPU ("SkylakeX", "Haswell", …).
  public static var coreName: String {
    guard let name = openblas_get_corename() else { return "unknown" }
    return String(cString: name)
  }
}
