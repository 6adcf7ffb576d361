import Tensors

/// How a model file names and shapes a multi-head layer's parameters.
///
/// Every name is read under a prefix — the layer's path inside a whole-model file, such as
/// `encoder.layer.3.attention.` — and, as `load_state_dict(strict=True)` does, every expected
/// tensor must be there with its exact shape and nothing else may sit under the prefix.
public enum WeightLayout: String, Sendable, Equatable, CaseIterable {
  /// `torch.nn.MultiheadAttention` (`batch_first=True`, `Hkv = H`, `D = E/H`):
  /// `in_proj_weight` `[3E, E]` (rows: query, key, value), `in_proj_bias` `[3E]`,
  /// `out_proj.weight` `[E, E]`, `out_proj.bias` `[E]` — both biases absent with `bias=False` —
  /// and with `add_bias_kv=True`, `bias_k` and `bias_v` `[1, 1, E]` (one more key and value).
  /// Its `kdim`/`vdim` variant (separate `q/k/v_proj_weight`) is not read.
  case torch
  /// Hugging Face's `BertAttention` (`D = E/H`): `self.{query,key,value}.{weight,bias}`
  /// (`[E, E]`, `[E]`), `output.dense.{weight,bias}`, `output.LayerNorm.{weight,bias}` (`[E]`);
  /// the output is `LayerNorm(dense(ctx) + x)`, eps 1e-12 unless given.
  case bert
  /// Hugging Face's `LlamaAttention`: `q_proj.weight` `[H·D, E]`, `k_proj.weight` and
  /// `v_proj.weight` `[Hkv·D, E]`, `o_proj.weight` `[E, H·D]`, no biases; rotary embeddings in the
  /// half-rotation layout with `rope_theta` (10,000 unless given). An older checkpoint's
  /// `rotary_emb.inv_freq` buffer is accepted and ignored (the frequencies follow from theta).
  case llama

  /// BERT's LayerNorm epsilon.
  public static let bertLayerNormEpsilon: Float = 1e-12
  /// Llama's `rope_theta` default.
  public static let llamaRopeTheta = 10_000.0
}

extension MultiHeadAttention {
  /// How a layer is read from named tensors (see `init(stateDict:layout:options:)`).
  public struct LoadOptions: Sendable, Equatable {
    /// Prepended to every name; a `.` is added when it does not end in one. Empty: none.
    public var prefix: String
    /// `H`, which the weights' shapes cannot tell.
    public var heads: Int
    /// `Hkv`: inferred from the key projection when `nil` (`H` for `torch` and `bert`).
    public var keyValueHeads: Int?
    /// Rotary embeddings' theta: `nil` means none for `torch` and `bert`, 10,000 for `llama`.
    public var ropeTheta: Double?
    public var ropeLayout: RotaryEmbedding.Layout
    /// BERT's LayerNorm epsilon (1e-12 when `nil`).
    public var layerNormEpsilon: Float?

    public init(
      prefix: String = "", heads: Int, keyValueHeads: Int? = nil, ropeTheta: Double? = nil,
      ropeLayout: RotaryEmbedding.Layout = .half, layerNormEpsilon: Float? = nil
    ) {
      self.prefix = prefix
      self.heads = heads
      self.keyValueHeads = keyValueHeads
      self.ropeTheta = ropeTheta
      self.ropeLayout = ropeLayout
      self.layerNormEpsilon = layerNormEpsilon
    }

    /// The prefix as names start with it.
    public var normalizedPrefix: String {
      prefix.isEmpty || prefix.hasSuffix(".") ? prefix : prefix + "."
    }
  }

  /// The layer whose parameters `stateDict` holds under `options.prefix` in `layout`.
  ///
  /// Throws `AttentionError.parameter` naming the tensor (with the prefix) for a missing,
  /// unexpected or mis-shaped one — the message gives the layout's expected shape — and
  /// `invalidArgument` when no name starts with the prefix, when `H` does not divide `E` (or the
  /// query projection's rows), or when `Hkv` does not divide `H`.
  public init(stateDict: StateDict, layout: WeightLayout, options: LoadOptions) throws {
    let prefix = options.normalizedPrefix
    let names = stateDict.names.filter { $0.hasPrefix(prefix) }
    guard !names.isEmpty else {
      let some = stateDict.names.prefix(4).map { quotedForMessage($0) }.joined(separator: ", ")
      throw AttentionError.invalidArgument(
        "no tensor name starts with the prefix \(quotedForMessage(prefix))"
          + (some.isEmpty ? " (the file holds no tensors)" : " (names look like \(some))"))
    }
    let heads = options.heads
    guard heads > 0 else {
      throw AttentionError.invalidArgument("the number of heads must be ≥ 1, got \(heads)")
    }
    var reader = ParameterReader(
      stateDict: stateDict, prefix: prefix, owner: "the \(layout.rawValue) layout")
    let query: Linear
    let key: Linear
    let value: Linear
    let output: Linear
    var norm: LayerNorm?
    var appended: AppendedKeyValue?
    var kvHeads = heads
    var theta = options.ropeTheta
    switch layout {
    case .torch, .bert:
      let e = try reader.width(
        of: layout == .torch ? "in_proj_weight" : "self.query.weight",
        rows: layout == .torch ? 3 : 1)
      _ = try Self.headDim(rows: e, heads: heads, what: "E = \(e)")
      try Self.checkSameHeads(options.keyValueHeads, heads: heads, layout: layout)
      if layout == .torch {
        let stackedWeight = try reader.tensor("in_proj_weight", [3 * e, e])
        // bias=False: neither in_proj_bias nor out_proj.bias.
        let biased = stateDict[prefix + "in_proj_bias"] != nil
        let stackedBias = biased ? try reader.tensor("in_proj_bias", [3 * e]) : nil
        func part(_ p: Int) throws -> Linear {
          try Linear(
            weight: Tensor(
              shape: [e, e], scalars: Array(stackedWeight.scalars[(p * e * e)..<((p + 1) * e * e)])),
            bias: stackedBias.map {
              try Tensor(shape: [e], scalars: Array($0.scalars[(p * e)..<((p + 1) * e)]))
            })
        }
        (query, key, value) = (try part(0), try part(1), try part(2))
        output = try reader.linear("out_proj", out: e, in: e, bias: biased)
        if stateDict[prefix + "bias_k"] != nil || stateDict[prefix + "bias_v"] != nil {
          appended = AppendedKeyValue(
            key: try reader.tensor("bias_k", [1, 1, e]).reshaped([e]),
            value: try reader.tensor("bias_v", [1, 1, e]).reshaped([e]))
        }
      } else {
        query = try reader.linear("self.query", out: e, in: e, bias: true)
        key = try reader.linear("self.key", out: e, in: e, bias: true)
        value = try reader.linear("self.value", out: e, in: e, bias: true)
        output = try reader.linear("output.dense", out: e, in: e, bias: true)
        norm = try LayerNorm(
          weight: reader.tensor("output.LayerNorm.weight", [e]),
          bias: reader.tensor("output.LayerNorm.bias", [e]),
          epsilon: options.layerNormEpsilon ?? WeightLayout.bertLayerNormEpsilon)
      }
    case .llama:
      let e = try reader.width(of: "q_proj.weight", rows: 1)
      let queryRows = try reader.rows(of: "q_proj.weight")
      let d = try Self.headDim(
        rows: queryRows, heads: heads, what: "q_proj.weight's \(queryRows) rows")
      let keyRows = try reader.rows(of: "k_proj.weight")
      guard keyRows % max(d, 1) == 0, keyRows > 0 else {
        throw AttentionError.parameter(
          name: prefix + "k_proj.weight",
          message: "has \(keyRows) rows, not a whole number of heads of D = \(d)")
      }
      kvHeads = options.keyValueHeads ?? keyRows / d
      query = try reader.linear("q_proj", out: heads * d, in: e, bias: false)
      key = try reader.linear("k_proj", out: kvHeads * d, in: e, bias: false)
      value = try reader.linear("v_proj", out: kvHeads * d, in: e, bias: false)
      output = try reader.linear("o_proj", out: e, in: heads * d, bias: false)
      reader.ignore("rotary_emb.inv_freq")
      theta = theta ?? WeightLayout.llamaRopeTheta
    }
    try reader.checkNoOthers(among: names)
    guard heads % kvHeads == 0 else {
      throw AttentionError.invalidArgument(
        "the key/value heads (\(kvHeads)) must divide the query heads (\(heads))")
    }
    let d = query.outputFeatures / heads
    let rotary = try theta.map {
      try RotaryEmbedding(theta: $0, dimension: d, layout: options.ropeLayout)
    }
    try self.init(
      queryProjection: query, keyProjection: key, valueProjection: value,
      outputProjection: output, heads: heads, keyValueHeads: kvHeads, rotary: rotary,
      residualNorm: norm, appendedKeyValue: appended)
  }

  /// `rows / H`, or an error saying that `H` does not divide `what`.
  private static func headDim(rows: Int, heads: Int, what: String) throws -> Int {
    guard rows % heads == 0 else {
      throw AttentionError.invalidArgument(
        "\(heads) heads do not divide \(what): the head dimension D must be a whole number")
    }
    return rows / heads
  }

  private static func checkSameHeads(_ kvHeads: Int?, heads: Int, layout: WeightLayout) throws {
    if let kvHeads, kvHeads != heads {
      throw AttentionError.invalidArgument(
        "the \(layout.rawValue) layout has as many key/value heads as query heads (\(heads)), got \(kvHeads)"
      )
    }
  }

  /// The parameters under their names in `layout` (with `prefix`), as the model's `state_dict`
  /// holds them; throws when the layer does not fit the layout (grouped heads or a missing bias
  /// in `torch` and `bert`, biases or a layer norm in `llama`).
  public func stateDict(layout: WeightLayout, prefix: String = "") throws -> StateDict {
    let p = LoadOptions(prefix: prefix, heads: heads).normalizedPrefix
    var tensors: [String: Tensor] = [:]
    func put(_ name: String, _ layer: Linear, bias: Bool) throws {
      tensors[p + name + ".weight"] = layer.weight
      guard bias == (layer.bias != nil) else {
        throw AttentionError.invalidArgument(
          "the \(layout.rawValue) layout \(bias ? "needs" : "has no") biases")
      }
      if let b = layer.bias { tensors[p + name + ".bias"] = b }
    }
    switch layout {
    case .torch, .bert:
      guard keyValueHeads == heads, headDim * heads == embedDim else {
        throw AttentionError.invalidArgument(
          "the \(layout.rawValue) layout needs Hkv = H and D = E/H")
      }
      if layout == .torch {
        guard residualNorm == nil else {
          throw AttentionError.invalidArgument("the torch layout has no layer norm")
        }
        let parts = [queryProjection, keyProjection, valueProjection]
        let biased = parts.allSatisfy { $0.bias != nil } && outputProjection.bias != nil
        guard biased || (parts + [outputProjection]).allSatisfy({ $0.bias == nil }) else {
          throw AttentionError.invalidArgument(
            "the torch layout has biases on all four projections or on none")
        }
        tensors[p + "in_proj_weight"] = try Tensor(
          shape: [3 * embedDim, embedDim], scalars: parts.flatMap(\.weight.scalars))
        if biased {
          tensors[p + "in_proj_bias"] = try Tensor(
            shape: [3 * embedDim], scalars: parts.flatMap { $0.bias!.scalars })
        }
        try put("out_proj", outputProjection, bias: biased)
        if let appended = appendedKeyValue {
          tensors[p + "bias_k"] = try appended.key.reshaped([1, 1, embedDim])
          tensors[p + "bias_v"] = try appended.value.reshaped([1, 1, embedDim])
        }
      } else {
        guard let residualNorm else {
          throw AttentionError.invalidArgument("the bert layout needs its layer norm")
        }
        try put("self.query", queryProjection, bias: true)
        try put("self.key", keyProjection, bias: true)
        try put("self.value", valueProjection, bias: true)
        try put("output.dense", outputProjection, bias: true)
        tensors[p + "output.LayerNorm.weight"] = residualNorm.weight
        tensors[p + "output.LayerNorm.bias"] = residualNorm.bias
      }
    case .llama:
      guard residualNorm == nil else {
        throw AttentionError.invalidArgument("the llama layout has no layer norm")
      }
      try put("q_proj", queryProjection, bias: false)
      try put("k_proj", keyProjection, bias: false)
      try put("v_proj", valueProjection, bias: false)
      try put("o_proj", outputProjection, bias: false)
    }
    return StateDict(tensors)
  }
}
