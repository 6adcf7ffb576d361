import AttentionKit
import AttentionVerification
import Foundation
import TensorIO
import Testing
import _TestSupport

/// `RelativePositionAttention` (exercise 3) against numpy's float64 fixtures, against its own
/// literal reference path, and its weights through safetensors.
///
/// Shape legend: `B` batch, `T` sequence length (self-attention), `D` = d_model, `M` the largest
/// relative distance (the table has `2M + 1` rows).
///
/// Tolerances are not fixed numbers but per-element worst-case bounds (`RelposErrorBounds`),
/// derived from the float32 unit roundoff `u = 2⁻²⁴`, `D` and `T` and the magnitudes of the case.
/// Observed errors are typically a few percent of them; a wrong index direction (`i − j`),
/// a missing bias, a transposed weight or a mis-scaled term exceeds them by orders of magnitude.
@Suite("Relative-position attention")
struct RelativePositionTests {
  // MARK: - Against numpy

  @Test("Output and weights match numpy's float64 values", arguments: try RelposCase.all())
  func matchesNumpy(spec: RelposCase) throws {
    let c = try LoadedRelposCase(spec)
    let result = try c.module(c.x, mask: c.mask)
    let weights = try #require(result.weights)
    #expect(result.output.shape == [spec.batch, spec.seqLen, spec.modelDim])
    #expect(weights.shape == [spec.batch, spec.seqLen, spec.seqLen])
    let bounds = RelposErrorBounds(module: c.module, x: c.x, keeps: c.keeps)
    let ratios = bounds.worstRatios(
      output: result.output, weights: weights,
      expectedOutput: c.expectedOutput, expectedWeights: c.expectedWeights)
    #expect(ratios.weights <= 1, "\(spec.name): weights error / bound = \(ratios.weights)")
    #expect(ratios.output <= 1, "\(spec.name): output error / bound = \(ratios.output)")
  }

  @Test("The reference path matches numpy to float64 rounding", arguments: try RelposCase.all())
  func referencePathMatchesNumpy(spec: RelposCase) throws {
    let c = try LoadedRelposCase(spec)
    let reference = try c.module.reference(c.x, mask: c.mask)
    // Both are float64 computations of the same sums from the same float32 inputs, in different
    // orders: they differ by a few units of 2⁻⁵³ relative to the magnitudes summed (≤ 10⁴ here),
    // far below 1e-12; an index or formula difference is ≥ 1e-3.
    let worstOutput = zip(reference.output, c.expectedOutput).map { abs($0 - $1) }.max() ?? 0
    let worstWeights = zip(reference.weights, c.expectedWeights).map { abs($0 - $1) }.max() ?? 0
    #expect(worstOutput <= 1e-12, "\(spec.name): max |Δoutput| = \(worstOutput)")
    #expect(worstWeights <= 1e-12, "\(spec.name): max |Δweights| = \(worstWeights)")
  }

  @Test("Fully masked rows give zero weights and a zero output", arguments: try RelposCase.all())
  func fullyMaskedRows(spec: RelposCase) throws {
    let c = try LoadedRelposCase(spec)
    let result = try c.module(c.x, mask: c.mask)
    let weights = try #require(result.weights)
    let (t, d) = (spec.seqLen, spec.modelDim)
    var zeroRows = 0
    for row in 0..<(spec.batch * t) {
      let (b, i) = (row / t, row % t)
      guard (0..<t).allSatisfy({ !c.keeps(b, i, $0) }) else { continue }
      zeroRows += 1
      #expect(weights.scalars[(row * t)..<(row * t + t)].allSatisfy { $0 == 0 })
      #expect(result.output.scalars[(row * d)..<(row * d + d)].allSatisfy { $0 == 0 })
    }
    #expect(zeroRows == spec.fullyMaskedRows, "\(spec.name): \(zeroRows) fully masked rows")
  }

  @Test("The position term is q_i·E[clip(j − i) + M]/√D", arguments: try RelposCase.all())
  func positionScores(spec: RelposCase) throws {
    let c = try LoadedRelposCase(spec)
    let (q, _, _) = try c.module.project(c.x)
    let scores = try c.module.positionScores(queries: q)
    let (t, d, m) = (spec.seqLen, spec.modelDim, spec.maxDistance)
    let e = c.module.relativeEmbeddings.weight.scalars
    let scale = 1 / Double(d).squareRoot()
    var worst = 0.0
    for row in 0..<(spec.batch * t) {
      let i = row % t
      for j in 0..<t {
        // Written out here, not taken from RelativePositionBias.index: key j seen from query i.
        let r = min(max(j - i, -m), m) + m
        var dot = 0.0
        var magnitude = 0.0
        for c in 0..<d {
          let product = Double(q.scalars[row * d + c]) * Double(e[r * d + c])
          dot += product
          magnitude += abs(product)
        }
        // One sgemm of D terms then the scale: γ_{D+1}·scale·Σ|q·e|.
        let bound =
          Float32Rounding.gamma(d + 1) * scale * magnitude + Double(Float.leastNormalMagnitude)
        worst = max(worst, abs(Double(scores.scalars[row * t + j]) - dot * scale) / bound)
      }
    }
    #expect(worst <= 1, "\(spec.name): position term error / bound = \(worst)")
  }

  // MARK: - Against the module's reference path

  @Test(
    "The fast path agrees with the reference path",
    arguments: [
      (d: 16, m: 4, t: 6, b: 2, mask: "none"), (d: 16, m: 3, t: 20, b: 2, mask: "causal"),
      (d: 8, m: 0, t: 5, b: 1, mask: "none"), (d: 24, m: 5, t: 11, b: 3, mask: "causal"),
      (d: 64, m: 16, t: 20, b: 2, mask: "none"),
    ])
  func fastEqualsReference(d: Int, m: Int, t: Int, b: Int, mask: String) throws {
    let seed = UInt64(d * 1000 + m * 10 + t)
    let module = try RelativePositionAttention(modelDim: d, maxDistance: m, seed: seed)
    let x = try Tensor.randomNormal(shape: [b, t, d], seed: seed, stream: RandomStream.input)
    let causal = mask == "causal"
    let attentionMask: AttentionMask = causal ? .causal : .none
    let result = try module(x, mask: attentionMask)
    let weights = try #require(result.weights)
    let reference = try module.reference(x, mask: attentionMask)
    let bounds = RelposErrorBounds(module: module, x: x) { _, i, j in !causal || j <= i }
    let ratios = bounds.worstRatios(
      output: result.output, weights: weights,
      expectedOutput: reference.output, expectedWeights: reference.weights)
    #expect(ratios.weights <= 1, "D \(d) M \(m) T \(t): weights error / bound = \(ratios.weights)")
    #expect(ratios.output <= 1, "D \(d) M \(m) T \(t): output error / bound = \(ratios.output)")
  }

  // MARK: - Memory

  @Test("4,096 tokens run in far less memory than the notebook's [T, T, D] gather")
  func longSequenceWorkspace() throws {
    let (b, t, d, m) = (1, 4096, 64, 16)
    let module = try RelativePositionAttention(modelDim: d, maxDistance: m, seed: 7)
    let x = try Tensor.randomNormal(shape: [b, t, d], seed: 7, stream: RandomStream.input)
    let result = try module(x)
    let weights = try #require(result.weights)
    #expect(result.output.shape == [b, t, d])
    let floatBytes = MemoryLayout<Float>.stride
    let gatherBytes = t * t * d * floatBytes  // the notebook's relative_emb: 4 GiB
    // What the module must hold at least: the [B, T, T] weights it returns and Q, K, V.
    let floor = (weights.count + 3 * b * t * d) * floatBytes
    #expect(result.workspaceBytes >= floor, "workspace \(result.workspaceBytes) < \(floor)")
    #expect(
      result.workspaceBytes < 1 << 30,
      "workspace \(formatBytes(result.workspaceBytes)) is not under 1 GiB")
    #expect(
      result.workspaceBytes * 16 <= gatherBytes,
      "workspace \(formatBytes(result.workspaceBytes)) vs gather \(formatBytes(gatherBytes))")
    // A few rows still agree with the float64 kernel on the module's own Q, K, V (a long run
    // that computes garbage cheaply would otherwise pass).
    let reference = try ReferenceAttention(
      queries: result.queries, keys: result.keys, values: result.values,
      terms: ScoreTerms(relativePosition: module.positionBias))
    for i in [0, 17, 2048, t - 1] {
      let row = reference.row(batch: 0, query: i)
      let w = row.weightErrorRatio(weights.scalars[(i * t)..<(i * t + t)])
      let o = row.outputErrorRatio(result.output.scalars[(i * d)..<(i * d + d)])
      #expect(w <= 1 && o <= 1, "row \(i): weights ratio \(w), output ratio \(o)")
    }
  }

  // MARK: - Weights

  @Test("Saving then loading the weights gives the same module and identical outputs")
  func safeTensorsRoundTrip() throws {
    let module = try RelativePositionAttention(modelDim: 12, maxDistance: 3, seed: 99)
    let path = temporaryPath("relpos-roundtrip.safetensors")
    defer { try? FileManager.default.removeItem(atPath: path) }
    try SafeTensors.write(module.stateDict.tensors, metadata: ["format": "pt"], to: path)
    let file = try SafeTensors.read(contentsOf: path)
    #expect(file.names.sorted() == RelativePositionAttention.parameterNames.sorted())
    #expect(file.tensors["relative_embeddings.weight"]?.shape == [7, 12])
    #expect(file.tensors["W_k.weight"]?.shape == [12, 12])
    let loaded = try RelativePositionAttention(stateDict: file.stateDict)
    #expect(loaded == module)
    #expect(loaded.maxDistance == 3 && loaded.modelDim == 12)
    let x = try Tensor.randomNormal(shape: [2, 9, 12], seed: 5, stream: RandomStream.input)
    let before = try module(x, mask: .causal)
    let after = try loaded(x, mask: .causal)
    #expect(before.output.scalars == after.output.scalars)
    #expect(before.weights?.scalars == after.weights?.scalars)
  }

  @Test("Loading the numpy fixture's weights infers d_model and M from their shapes")
  func dimensionsFromFile() throws {
    for spec in try RelposCase.all() {
      let file = try SafeTensors.read(contentsOf: ReferenceFixtures.path(spec.params.file))
      let (d, m) = try RelativePositionAttention.dimensions(in: file.stateDict)
      #expect(d == spec.modelDim && m == spec.maxDistance, "\(spec.name): D \(d), M \(m)")
      // The file's tensors are the module's parameters, unchanged.
      let module = try RelativePositionAttention(stateDict: file.stateDict)
      #expect(module.stateDict == file.stateDict, "\(spec.name)")
    }
  }

  @Test(
    "A missing, misshapen or unexpected tensor is an error naming it and the file",
    arguments: [
      ("drop W_v.bias", "W_v.bias"), ("W_k.weight [12, 11]", "W_k.weight"),
      ("W_q.bias [11]", "W_q.bias"),
      (
        "relative_embeddings.weight [6, 12]",
        "relative_embeddings.weight"
      ),
      ("drop relative_embeddings.weight", "relative_embeddings.weight"),
      ("add extra.weight", "extra.weight"),
    ])
  func loadingErrors(change: String, tensor: String) throws {
    let module = try RelativePositionAttention(modelDim: 12, maxDistance: 3, seed: 1)
    var tensors = module.stateDict.tensors
    let words = change.split(separator: " ", maxSplits: 1).map(String.init)
    switch words[0] {
    case "drop": tensors[words[1]] = nil
    case "add": tensors[words[1]] = try Tensor(shape: [2])
    default:
      let shape = words[1].dropFirst().dropLast().split(separator: ",").map {
        Int($0.trimmingCharacters(in: .whitespaces))!
      }
      tensors[words[0]] = try Tensor(shape: shape)
    }
    let path = temporaryPath("relpos-bad.safetensors")
    defer { try? FileManager.default.removeItem(atPath: path) }
    try SafeTensors.write(tensors, to: path)
    let file = try SafeTensors.read(contentsOf: path)
    let error = try #require(throws: AttentionError.self) {
      try file.naming { try RelativePositionAttention(stateDict: file.stateDict) }
    }
    let message = error.description
    #expect(message.contains(path) && message.contains(tensor), "\(change): \(message)")
    #expect(!message.contains("\n"), "one line: \(message)")
  }

  // MARK: - Layers

  @Test("Linear is x·Wᵀ + b over every leading dimension, in one call")
  func linearLayer() throws {
    // Non-square, so that a transposed weight cannot pass.
    let layer = try Linear(inputFeatures: 5, outputFeatures: 3, seed: 11, stream: 0)
    #expect(layer.weight.shape == [3, 5] && layer.bias?.shape == [3])
    let x = try Tensor.randomNormal(shape: [2, 4, 5], seed: 3, stream: 0)
    let y = try layer(x)
    #expect(y.shape == [2, 4, 3])
    var worst = 0.0
    for row in 0..<8 {
      for o in 0..<3 {
        let bias = Double(layer.bias!.scalars[o])
        var sum = bias
        var magnitude = abs(bias)
        for c in 0..<5 {
          let term = Double(x.scalars[row * 5 + c]) * Double(layer.weight.scalars[o * 5 + c])
          sum += term
          magnitude += abs(term)
        }
        worst = max(
          worst, abs(Double(y.scalars[row * 3 + o]) - sum) / (Float32Rounding.gamma(6) * magnitude))
      }
    }
    #expect(worst <= 1, "error / γ₆·Σ|x·w| = \(worst)")
    #expect(throws: AttentionError.self) { try layer(Tensor(shape: [2, 3])) }
  }

  @Test("Fresh parameters follow PyTorch's default initialization on their own streams")
  func initialization() throws {
    let (d, m, seed): (Int, Int, UInt64) = (64, 16, 42)
    let module = try RelativePositionAttention(modelDim: d, maxDistance: m, seed: seed)
    let tensors = module.stateDict
    let bound = 1 / Float(d).squareRoot()
    for (k, name) in RelativePositionAttention.parameterNames.enumerated() {
      let tensor = try #require(tensors[name])
      let stream = RandomStream.parameters + UInt32(k)
      let expected =
        name.hasPrefix("relative")
        ? try Tensor.randomNormal(shape: tensor.shape, seed: seed, stream: stream)
        : try Tensor.randomUniform(
          shape: tensor.shape, low: -bound, high: bound, seed: seed, stream: stream)
      #expect(tensor == expected, "\(name) is not stream parameters + \(k)")
      if !name.hasPrefix("relative") {
        #expect(tensor.scalars.allSatisfy { abs($0) <= bound }, "\(name) outside ±1/√D")
      }
    }
    // Distinct streams: no two projections share their numbers.
    #expect(tensors["W_q.weight"] != tensors["W_k.weight"])
    #expect(tensors["W_k.weight"] != tensors["W_v.weight"])
    // E is standard normal: with 2112 samples, mean and variance are within 5 standard errors.
    let e = try #require(tensors["relative_embeddings.weight"]).scalars.map(Double.init)
    #expect(e.count == (2 * m + 1) * d)
    let n = Double(e.count)
    let mean = e.reduce(0, +) / n
    let variance = e.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / n
    #expect(abs(mean) <= 5 / n.squareRoot(), "mean \(mean)")
    #expect(abs(variance - 1) <= 5 * (2 / n).squareRoot(), "variance \(variance)")
  }
}

// MARK: - Fixtures

/// One `relative_position` case of the manifest (see the script's docstring for the schema).
struct RelposCase: Decodable, Sendable, CustomTestStringConvertible {
  struct Params: Decodable, Sendable {
    var file: String
    var dtype: String
    var tensors: [String: [Int]]
  }
  struct Expected: Decodable, Sendable {
    var output: FileRef
    var weights: FileRef
  }

  var name: String
  var description: String
  var batch: Int
  var seqLen: Int
  var modelDim: Int
  var maxDistance: Int
  var params: Params
  var x: FileRef
  var mask: MaskRef?
  var fullyMaskedRows: Int
  var expected: Expected

  enum CodingKeys: String, CodingKey {
    case name, description, batch, params, x, mask, expected
    case seqLen = "seq_len"
    case modelDim = "d_model"
    case maxDistance = "max_relative_position"
    case fullyMaskedRows = "fully_masked_rows"
  }

  var testDescription: String { name }

  /// Every case of the manifest's `relative_position` section.
  static func all() throws -> [RelposCase] {
    struct Section: Decodable {
      var relative_position: [RelposCase]
    }
    let url = ReferenceFixtures.folder.appendingPathComponent("manifest.json")
    let cases = try JSONDecoder().decode(Section.self, from: Data(contentsOf: url))
      .relative_position
    guard !cases.isEmpty else { throw FixtureError("no relative_position cases in \(url.path)") }
    return cases
  }
}

/// A case with its files loaded: the module from the safetensors weights, x, the mask, and the
/// float64 expected values at full precision.
struct LoadedRelposCase {
  var module: RelativePositionAttention
  /// `[B, T, D]`.
  var x: Tensor
  var mask: AttentionMask
  /// Whether query `i` of batch `b` may see key `j` (read from the mask tensor directly).
  var keeps: @Sendable (Int, Int, Int) -> Bool
  /// `[B, T, D]` and `[B, T, T]`, flattened.
  var expectedOutput: [Double]
  var expectedWeights: [Double]

  init(_ spec: RelposCase) throws {
    let file = try SafeTensors.read(contentsOf: ReferenceFixtures.path(spec.params.file))
    for (name, shape) in spec.params.tensors {
      guard file.tensors[name]?.shape == shape else {
        throw FixtureError("\(spec.params.file): \(name) is not \(shape) as the manifest says")
      }
    }
    module = try RelativePositionAttention(stateDict: file.stateDict)
    x = try ReferenceFixtures.tensor(spec.x)
    let t = spec.seqLen
    if let ref = spec.mask {
      guard ref.kind == "keep" else { throw FixtureError("\(spec.name): mask kind \(ref.kind)") }
      let keep = try ReferenceFixtures.tensor(ref.fileRef)
      mask = .keep(keep)
      // [T, T] or [B, T, T]: a [T, T] mask is the same for every batch.
      let perBatch = keep.rank == 3 ? t * t : 0
      let scalars = keep.scalars
      keeps = { b, i, j in scalars[b * perBatch + i * t + j] != 0 }
    } else {
      mask = .none
      keeps = { _, _, _ in true }
    }
    expectedOutput = try ReferenceFixtures.doubles(spec.expected.output)
    expectedWeights = try ReferenceFixtures.doubles(spec.expected.weights)
  }
}

// MARK: - Error bounds

/// Worst-case bounds on the difference between the float32 module and the exact (float64)
/// values of every weight and output element, in the manner of `ReferenceRow`, but starting from
/// x and the parameters rather than from Q, K, V — so they also cover the projections.
///
/// With `u = 2⁻²⁴` and `γₙ = n·u/(1 − n·u)` (Higham, *Accuracy and Stability*, §3.1), and exact
/// values `q, k, v, E`:
/// - each projected element `p_o = b_o + Σ_c x_c·W_oc` (one sgemm onto the bias) is off by
///   `δp_o ≤ γ_{D+1}·(|b_o| + Σ_c |x_c·W_oc|)`;
/// - a score `s_j = scale·(Σ_c q_c·k_jc + Σ_c q_c·E_rc)` computed from the rounded projections
///   (two sgemms, then one addition and the mask) is off by at most
///   `δs_j = scale·Σ_c [δq_c·(|k̃_jc| + |E_rc|) + |q_c|·δk_jc] + (γ_{D+2} + γ₂)·scale·Σ_c
///   |q̃_c|·(|k̃_jc| + |E_rc|)`, with `|q̃| = |q| + δq`, `|k̃| = |k| + δk`;
/// - softmax turns score errors of at most `Δ = max_j δs_j` into relative weight errors of at
///   most `ρ = e^{2Δ} − 1 + γ_{T+8}` (the exponentials, the sum, the division);
/// - `o_c = Σ_j w_j·v_jc` in float32 is off by at most
///   `Σ_j w_j·[(ρ + γ_T·(1 + ρ))·(|v_jc| + δv_jc) + δv_jc]`.
/// Masked keys have weight exactly 0 on both sides and enter no bound.
struct RelposErrorBounds {
  let batch: Int
  let length: Int
  let modelDim: Int
  /// `ρ` of each row, `[B·T]`.
  private(set) var rowRelative: [Double] = []
  /// `|v| + δv` and `δv`, `[B, T, D]`.
  private(set) var valueMagnitude: [Double] = []
  private(set) var valueError: [Double] = []

  init(
    module: RelativePositionAttention, x: Tensor,
    keeps: (_ batch: Int, _ query: Int, _ key: Int) -> Bool
  ) {
    (batch, length, modelDim) = (x.shape[0], x.shape[1], module.modelDim)
    let (b, t, d) = (batch, length, modelDim)
    let m = module.maxDistance
    let scale = 1 / Double(d).squareRoot()
    let e = module.relativeEmbeddings.weight.scalars.map { abs(Double($0)) }

    // |p| + δp and δp of each projection, [B, T, D], from exact float64 sums.
    func project(_ layer: Linear) -> (magnitude: [Double], error: [Double]) {
      var magnitude = [Double](repeating: 0, count: b * t * d)
      var error = [Double](repeating: 0, count: b * t * d)
      for row in 0..<(b * t) {
        for o in 0..<d {
          let bias = Double(layer.bias?.scalars[o] ?? 0)
          var sum = bias
          var absolute = abs(bias)
          for c in 0..<d {
            let term = Double(x.scalars[row * d + c]) * Double(layer.weight.scalars[o * d + c])
            sum += term
            absolute += abs(term)
          }
          error[row * d + o] = Float32Rounding.gamma(d + 1) * absolute
          magnitude[row * d + o] = abs(sum) + error[row * d + o]
        }
      }
      return (magnitude, error)
    }
    let q = project(module.queryProjection)
    let k = project(module.keyProjection)
    (valueMagnitude, valueError) = project(module.valueProjection)

    rowRelative = [Double](repeating: 0, count: b * t)
    for row in 0..<(b * t) {
      let (bi, i) = (row / t, row % t)
      var worstScore = 0.0
      for j in 0..<t where keeps(bi, i, j) {
        let r = min(max(j - i, -m), m) + m
        let key = (bi * t + j) * d
        var propagated = 0.0
        var products = 0.0
        for c in 0..<d {
          let qc = row * d + c
          let positional = e[r * d + c]
          propagated +=
            q.error[qc] * (k.magnitude[key + c] + positional)
            + (q.magnitude[qc] - q.error[qc]) * k.error[key + c]
          products += q.magnitude[qc] * (k.magnitude[key + c] + positional)
        }
        worstScore = max(
          worstScore,
          scale * propagated + (Float32Rounding.gamma(d + 2) + Float32Rounding.gamma(2)) * scale
            * products)
      }
      rowRelative[row] = expm1(2 * worstScore) + Float32Rounding.gamma(t + 8)
    }
  }

  /// The worst |observed − expected| / bound over the weights and over the output (≤ 1 passes;
  /// NaN gives infinity). `expected…` are exact values, `[B, T, D]` and `[B, T, T]` flattened.
  func worstRatios(
    output: Tensor, weights: Tensor, expectedOutput: [Double], expectedWeights: [Double]
  ) -> (weights: Double, output: Double) {
    let (t, d) = (length, modelDim)
    let tiny = Double(Float.leastNormalMagnitude)
    func ratio(_ observed: Float, _ expected: Double, _ bound: Double) -> Double {
      let r = abs(Double(observed) - expected) / (bound + tiny)
      return r.isNaN ? .infinity : r
    }
    var worstWeights = 0.0
    var worstOutput = 0.0
    for row in 0..<(batch * t) {
      let rho = rowRelative[row]
      let spread = rho + Float32Rounding.gamma(t) * (1 + rho)
      let b = row / t
      var bounds = [Double](repeating: 0, count: d)
      for j in 0..<t {
        let w = expectedWeights[row * t + j]
        worstWeights = max(worstWeights, ratio(weights.scalars[row * t + j], w, w * rho))
        guard w != 0 else { continue }
        let value = (b * t + j) * d
        for c in 0..<d {
          bounds[c] += w * (spread * valueMagnitude[value + c] + valueError[value + c])
        }
      }
      for c in 0..<d {
        worstOutput = max(
          worstOutput, ratio(output.scalars[row * d + c], expectedOutput[row * d + c], bounds[c]))
      }
    }
    return (worstWeights, worstOutput)
  }
}

/// A fresh path in the temporary directory.
private func temporaryPath(_ name: String) -> String {
  FileManager.default.temporaryDirectory
    .appendingPathComponent("\(UUID().uuidString)-\(name)").path
}
