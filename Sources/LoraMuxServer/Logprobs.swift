import Foundation
import LoraMux

/// OpenAI's two logprobs shapes: completions' parallel lists
/// (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) and chat's
/// `content` entries (`token`, `logprob`, `bytes`, `top_logprobs`).
struct LogprobFormatter {
    let tokenizer: BPETokenizer
    /// Characters of text before the next token, for `text_offset`.
    private var decoder: TokenDecoder
    private var offset = 0

    init(tokenizer: BPETokenizer) {
        self.tokenizer = tokenizer
        decoder = TokenDecoder(tokenizer: tokenizer)
    }

    /// A token as text: its bytes decoded on their own, so a token holding
    /// part of a UTF-8 character shows U+FFFD (chat's `bytes` keep the exact bytes).
    func text(_ id: Int32) -> String { String(decoding: tokenizer.bytes(of: id), as: UTF8.self) }

    /// -inf (a token the model gives no mass) is not JSON; vLLM sends -9999 in its place.
    static func number(_ x: Float) -> Double { x.isFinite ? Double(x) : -9999 }

    /// Advances `text_offset` past one token and returns where it started.
    mutating func advance(_ id: Int32) -> Int {
        let at = offset
        offset += decoder.feed(id).unicodeScalars.count  // code points, as Python (and OpenAI) count them
        return at
    }

    /// Completions: the lists for `tokens`; `nil` entries (the prompt's first
    /// token) get null logprobs, as OpenAI gives them.
    mutating func completion(_ entries: [(token: Int32, logprob: TokenLogprob?)]) -> [String: Any] {
        var tokens: [String] = [], lps: [Any] = [], tops: [Any] = [], offsets: [Int] = []
        for e in entries {
            tokens.append(text(e.token))
            offsets.append(advance(e.token))
            if let lp = e.logprob {
                lps.append(Self.number(lp.logprob))
                var top: [String: Double] = [:]
                // Alternatives whose texts coincide keep the likelier one.
                for t in lp.top.reversed() { top[text(t.token)] = Self.number(t.logprob) }
                tops.append(top)
            } else {
                lps.append(NSNull())
                tops.append(NSNull())
            }
        }
        return ["tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets]
    }

    /// Chat: one `content` entry.
    func chat(_ lp: TokenLogprob) -> [String: Any] {
        func entry(_ id: Int32, _ x: Float) -> [String: Any] {
            ["token": text(id), "logprob": Self.number(x), "bytes": tokenizer.bytes(of: id).map(Int.init)]
        }
        var e = entry(lp.token, lp.logprob)
        e["top_logprobs"] = lp.top.map { entry($0.token, $0.logprob) }
        return e
    }
}
