import ArgumentParser
import Foundation
import LoraMux

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Generate a completion for one prompt.")

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var adapterOptions: AdapterOptions

    @Option(help: "Prompt text.")
    var prompt: String?

    @Flag(help: "Wrap --prompt in the model's chat template as a user message.")
    var chat = false

    @Option(help: "Prompt as comma-separated token ids (instead of --prompt).")
    var promptIds: String?

    @Option(help: "Maximum number of new tokens.")
    var maxTokens: Int = 64

    @Option(help: "Sampling temperature; 0 is greedy.")
    var temperature: Float = 0

    @Option(help: "Keep only the K most likely tokens (0: off).")
    var topK: Int = 0

    @Option(help: "Nucleus sampling mass (1: off).")
    var topP: Float = 1

    @Option(help: "Random seed for sampling.")
    var seed: UInt64?

    @Option(help: "Stop when this text appears (repeatable).")
    var stop: [String] = []

    @Flag(help: "Do not stop at end-of-sequence tokens.")
    var ignoreEos = false

    @Flag(help: "Print {\"prompt_ids\",\"token_ids\",\"text\"} as JSON.")
    var json = false

    func validate() throws {
        if (prompt == nil) == (promptIds == nil) { throw ValidationError("give exactly one of --prompt or --prompt-ids") }
        if chat && prompt == nil { throw ValidationError("--chat needs --prompt") }
        if maxTokens < 1 { throw ValidationError("--max-tokens must be at least 1") }
    }

    func run() throws {
        modelOptions.setThreads()
        let weights = try LlamaWeights.load(path: modelOptions.model)
        let model = LlamaModel(weights: weights)
        let adapter = try adapterOptions.load(base: weights)
        // Token-id prompts work without a tokenizer (e.g. test models); text needs one.
        let tokenizer: BPETokenizer?
        do {
            tokenizer = try loadTokenizer(for: weights)
        } catch {
            if prompt != nil { throw error }
            print("warning: no tokenizer (\(error.localizedDescription)); output text will be empty", to: &stderrStream)
            tokenizer = nil
        }
        var ids: [Int32]
        if let text = prompt, let tokenizer {
            if chat {
                guard let template = tokenizer.chatTemplate else {
                    throw ValidationError("the model has no chat template this build understands")
                }
                ids = tokenizer.encode(try template.render([ChatMessage(role: "user", content: text)], addGenerationPrompt: true))
            } else {
                ids = tokenizer.encode(text, addSpecial: true)
            }
        } else {
            ids = try promptIds!.split(separator: ",").map {
                guard let v = Int32($0.trimmingCharacters(in: .whitespaces)) else {
                    throw ValidationError("--prompt-ids: '\($0)' is not an integer")
                }
                return v
            }
        }
        let params = SamplingParams(temperature: temperature, topK: topK, topP: topP, seed: seed,
                                    maxTokens: maxTokens, stop: stop, ignoreEOS: ignoreEos)
        let gen = try Generator(model: model, tokenizer: tokenizer)
        var decoder = tokenizer.map { TokenDecoder(tokenizer: $0) }
        let t0 = Date()
        var firstToken: Date?
        let result = try gen.generate(promptIds: ids, params: params, adapter: adapter) { id in
            if firstToken == nil { firstToken = Date() }
            if !json {
                let piece = decoder?.feed(id) ?? ""
                if !piece.isEmpty { FileHandle.standardOutput.write(Data(piece.utf8)) }
            }
            return true
        }
        let t1 = Date()
        if json {
            let obj: [String: Any] = ["prompt_ids": result.promptIds.map(Int.init), "token_ids": result.tokenIds.map(Int.init),
                                      "text": result.text, "finish_reason": result.finishReason.rawValue]
            let data = try JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys, .withoutEscapingSlashes])
            print(String(decoding: data, as: UTF8.self))
        } else {
            print(decoder?.finish() ?? "")
        }
        let prefill = (firstToken ?? t1).timeIntervalSince(t0)
        let decode = t1.timeIntervalSince(firstToken ?? t1)
        let n = result.tokenIds.count
        let decodeRate = n > 1 ? Double(n - 1) / max(decode, 1e-9) : 0.0  // a Double literal: see BenchReplay
        print(String(format: "[%d prompt tokens in %.3fs (%.1f tok/s), %d new tokens at %.1f tok/s]",
                     ids.count, prefill, Double(ids.count) / max(prefill, 1e-9), n, decodeRate), to: &stderrStream)
    }
}
