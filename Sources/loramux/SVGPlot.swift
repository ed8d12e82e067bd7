import Foundation

/// A small line chart as SVG text: one line per series, log2 x axis (batch sizes).
enum SVGPlot {
    static func lines(title: String, xLabel: String, yLabel: String, series: [(String, [(Double, Double)])]) -> String {
        let w = 720.0, h = 440.0, left = 70.0, right = 150.0, top = 40.0, bottom = 50.0
        let pts = series.flatMap(\.1)
        guard !pts.isEmpty else { return "<svg xmlns=\"http://www.w3.org/2000/svg\"/>" }
        let xs = pts.map { log2(max($0.0, 1)) }
        let (x0, x1) = (xs.min()!, max(xs.max()!, xs.min()! + 1))
        let yMax = niceCeil(pts.map(\.1).max()! * 1.05)
        func X(_ x: Double) -> Double { left + (log2(max(x, 1)) - x0) / (x1 - x0) * (w - left - right) }
        func Y(_ y: Double) -> Double { h - bottom - y / yMax * (h - top - bottom) }
        let colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]
        var s = """
        <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(w))" height="\(Int(h))" font-family="sans-serif" font-size="12">
        <rect width="100%" height="100%" fill="white"/>
        <text x="\(w / 2)" y="22" text-anchor="middle" font-size="15">\(escape(title))</text>
        <line x1="\(left)" y1="\(h - bottom)" x2="\(w - right)" y2="\(h - bottom)" stroke="black"/>
        <line x1="\(left)" y1="\(top)" x2="\(left)" y2="\(h - bottom)" stroke="black"/>
        <text x="\((left + w - right) / 2)" y="\(h - 12)" text-anchor="middle">\(escape(xLabel))</text>
        <text x="18" y="\((top + h - bottom) / 2)" text-anchor="middle" transform="rotate(-90 18 \((top + h - bottom) / 2))">\(escape(yLabel))</text>

        """
        for i in 0...5 {
            let y = yMax * Double(i) / 5
            s += "<line x1=\"\(left)\" y1=\"\(Y(y))\" x2=\"\(w - right)\" y2=\"\(Y(y))\" stroke=\"#ddd\"/>"
            s += "<text x=\"\(left - 6)\" y=\"\(Y(y) + 4)\" text-anchor=\"end\">\(Int(y))</text>\n"
        }
        for x in Set(pts.map(\.0)).sorted() {
            s += "<text x=\"\(X(x))\" y=\"\(h - bottom + 16)\" text-anchor=\"middle\">\(Int(x))</text>\n"
        }
        for (i, (name, p)) in series.enumerated() {
            let c = colors[i % colors.count]
            let path = p.sorted { $0.0 < $1.0 }.map { "\(X($0.0)),\(Y($0.1))" }.joined(separator: " ")
            s += "<polyline fill=\"none\" stroke=\"\(c)\" stroke-width=\"2\" points=\"\(path)\"/>\n"
            for q in p { s += "<circle cx=\"\(X(q.0))\" cy=\"\(Y(q.1))\" r=\"3\" fill=\"\(c)\"/>\n" }
            let ly = top + 10 + Double(i) * 20
            s += "<line x1=\"\(w - right + 15)\" y1=\"\(ly)\" x2=\"\(w - right + 35)\" y2=\"\(ly)\" stroke=\"\(c)\" stroke-width=\"2\"/>"
            s += "<text x=\"\(w - right + 40)\" y=\"\(ly + 4)\">\(escape(name))</text>\n"
        }
        return s + "</svg>\n"
    }

    static func niceCeil(_ v: Double) -> Double {
        guard v > 0 else { return 1 }
        let p = pow(10, floor(log10(v)))
        for m in [1.0, 2, 2.5, 5, 10] where m * p >= v { return m * p }
        return 10 * p
    }

    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }
}
