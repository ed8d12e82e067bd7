import Foundation
import XCTest
@testable import LoraMux

/// The Jinja interpreter against transformers' own chat-template renderer
/// (jinja2 with trim_blocks, lstrip_blocks, loopcontrols and its globals):
/// `jinja_templates.json` and `chat_templates.json` hold what it rendered.
final class JinjaTests: XCTestCase {
    struct Conversation: Decodable {
        let messages: [ChatMessage]
        let add_generation_prompt: Bool
        let expected: String?
        let error: String?
    }

    struct Model: Decodable {
        let source: String
        let special_tokens: [String: String]
        let conversations: [Conversation]
    }

    struct Case: Decodable {
        let template: String
        let context: String
        let expected: String?
        let error: String?
    }

    struct Fixture: Decodable {
        let now_utc: String
        let models: [String: Model]
        let cases: [Case]
    }

    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures")

    func load() throws -> Fixture {
        try JSONDecoder().decode(Fixture.self, from: Data(contentsOf: Self.fixtures.appendingPathComponent("jinja_templates.json")))
    }

    /// The pinned `datetime.now()` of the fixture, as the local time it was
    /// on the machine that rendered it (transformers' strftime_now is local).
    func pinnedNow(_ f: Fixture) throws -> Date {
        let parts = f.now_utc.dropLast().split(whereSeparator: { "-T:".contains($0) }).compactMap { Int($0) }
        var c = DateComponents()
        (c.year, c.month, c.day, c.hour, c.minute, c.second) = (parts[0], parts[1], parts[2], parts[3], parts[4], parts[5])
        return try XCTUnwrap(Calendar.current.date(from: c))
    }

    func testModelTemplatesRenderLikeTransformers() throws {
        let f = try load()
        XCTAssertEqual(Set(f.models.keys), ["zephyr", "mistral-v0.1", "mistral-v0.3", "phi-3", "gemma", "qwen2.5"])
        var rendered = 0, refused = 0
        for (name, m) in f.models.sorted(by: { $0.key < $1.key }) {
            let source = try String(contentsOf: Self.fixtures.appendingPathComponent(m.source), encoding: .utf8)
            let t = try JinjaChatTemplate(source: source, specialTokens: m.special_tokens)
            for c in m.conversations {
                let label = "\(name): \(c.messages.map(\.role))"
                if let expected = c.expected {
                    XCTAssertEqual(try t.render(c.messages, addGenerationPrompt: c.add_generation_prompt), expected, label)
                    rendered += 1
                } else {
                    XCTAssertThrowsError(try t.render(c.messages, addGenerationPrompt: c.add_generation_prompt), label) { e in
                        XCTAssertEqual((e as? JinjaError)?.kind, .raised, label)
                        XCTAssertEqual((e as? JinjaError)?.message, c.error, label)
                    }
                    refused += 1
                }
            }
        }
        XCTAssertGreaterThan(rendered, 30)
        XCTAssertGreaterThan(refused, 10)
    }

    func testInterpreterCasesRenderLikeJinja2() throws {
        let f = try load()
        let now = try pinnedNow(f)
        XCTAssertGreaterThan(f.cases.count, 40)
        for c in f.cases {
            let label = String(c.template.prefix(120))
            let context: [String: JinjaValue]
            guard case let .dict(d) = try JinjaChatTemplate.evaluate(c.context) else { return XCTFail("context of \(label)") }
            context = Dictionary(uniqueKeysWithValues: d.pairs.map { ($0.key, $0.value) })
            do {
                let t = try JinjaChatTemplate(source: c.template, specialTokens: [:])
                let out = try t.render(context: context, now: now)
                XCTAssertEqual(out, c.expected, label)
                XCTAssertNil(c.error, "jinja2 refused \(label) with \(c.error ?? ""), we rendered \(out.debugDescription)")
            } catch let e as JinjaError {
                XCTAssertNotNil(c.error, "jinja2 rendered \(label) as \(c.expected?.debugDescription ?? ""), we failed: \(e)")
                if let want = c.error, want.hasPrefix("TemplateError: ") {
                    // raise_exception's own message is what a client sees.
                    XCTAssertEqual(e.kind, .raised, label)
                    XCTAssertEqual("TemplateError: " + e.message, want, label)
                }
            }
        }
    }

    /// The engine renders the templates LoraMux also has native renderings
    /// of (SmolLM2's ChatML, Llama 2, 3, 3.1, 3.2) exactly as transformers does.
    func testNativeTemplatesThroughTheInterpreter() throws {
        struct Family: Decodable {
            let template: String
            let special_tokens: [String: String]?
            let now_utc: String?
            let conversations: [Conversation]
        }
        let data = try Data(contentsOf: Self.fixtures.appendingPathComponent("chat_templates.json"))
        let families = try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: Any])
        var checked = 0
        for name in ["chatml", "llama3", "llama31", "llama32", "llama2"] {
            let raw = try JSONSerialization.data(withJSONObject: try XCTUnwrap(families[name], name))
            let fam = try JSONDecoder().decode(Family.self, from: raw)
            let t = try JinjaChatTemplate(source: fam.template, specialTokens: fam.special_tokens ?? [:])
            let now = try fam.now_utc.map { s in try XCTUnwrap(ISO8601DateFormatter().date(from: s)) } ?? Date()
            for c in fam.conversations {
                if let expected = c.expected {
                    XCTAssertEqual(try t.render(c.messages, addGenerationPrompt: c.add_generation_prompt, now: now), expected, name)
                } else {
                    XCTAssertThrowsError(try t.render(c.messages, addGenerationPrompt: c.add_generation_prompt, now: now), name)
                }
                checked += 1
            }
        }
        XCTAssertGreaterThan(checked, 25)
    }

    /// A runaway template stops with an error instead of looping or
    /// filling memory; the server stays up.
    func testRunawayTemplatesAreBounded() throws {
        for src in ["{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                    "{% for i in range(100001) %}{% endfor %}", "{% for i in range(100000) %}{% for j in range(3) %}{% endfor %}{% endfor %}",
                    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
                    "{% set s = 'x' * 10000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
                    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
                    "{{ 'ab' * 100000000 }}", "{{ ('x' * 1000000)|replace('', 'yyyy') }}", "{{ ('x\\n' * 100000)|indent('y' * 100) }}",
                    "{% set s = 'x' * 4000000 %}{{ [s, s] }}", "{% set s = 'x' * 4000000 %}{{ ([s, s]|upper)|length }}", "{% set s = 'x' * 4000000 %}{{ ({'a': s, 'b': s}|trim)|length }}", "{{ ['x' * 3000000, 'y' * 3000000]|join }}",
                    "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = [ns.l] %}{% endfor %}{{ ns.l }}",
                    "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = dict(a=ns.l) %}{% endfor %}",
                    "{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}",
                    "{% set ns = namespace(l=[1]) %}{% for i in range(30) %}{% set ns.l = ns.l + ns.l %}{% endfor %}"] {
            let t = try JinjaChatTemplate(source: src, specialTokens: [:])
            XCTAssertThrowsError(try t.render([.user("hi")], addGenerationPrompt: true), src) { e in
                XCTAssertEqual((e as? JinjaError)?.kind, .runtime, src)
            }
        }
        // Nesting in the template text is bounded at parse time (no stack overflow at load).
        XCTAssertThrowsError(try JinjaChatTemplate(source: "{{ " + String(repeating: "[", count: 5000) + String(repeating: "]", count: 5000) + " }}",
                                                   specialTokens: [:]))
        XCTAssertThrowsError(try JinjaChatTemplate(source: String(repeating: "{% if true %}", count: 5000) + String(repeating: "{% endif %}", count: 5000),
                                                   specialTokens: [:]))
        XCTAssertThrowsError(try JinjaChatTemplate(source: "{{ " + String(repeating: "-", count: 5000) + "1 }}", specialTokens: [:]))
    }
}
