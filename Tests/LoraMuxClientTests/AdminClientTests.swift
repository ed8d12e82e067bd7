import XCTest
@testable import LoraMuxClient

final class AdminClientTests: XCTestCase {
    func testServerAndTokenComeFromFlagsOrEnvironment() throws {
        let env = ["LORAMUX_SERVER": "http://10.0.0.5:9000/", "LORAMUX_ADMIN_TOKEN": "s3cret"]
        let c = try AdminClient(server: nil, environment: env)
        XCTAssertEqual(c.listRequest().url, "http://10.0.0.5:9000/v1/adapters")
        XCTAssertEqual(c.listRequest().headers["Authorization"], "Bearer s3cret")
        let d = try AdminClient(server: "http://127.0.0.1:1234", environment: [:])
        XCTAssertEqual(d.listRequest().url, "http://127.0.0.1:1234/v1/adapters")
        XCTAssertNil(d.listRequest().headers["Authorization"])
        XCTAssertEqual(try AdminClient(server: nil, environment: [:]).server.absoluteString, "http://127.0.0.1:8080")
        XCTAssertThrowsError(try AdminClient(server: "ftp://x", environment: [:]))
        XCTAssertThrowsError(try AdminClient(server: "not a url", environment: [:]))
    }

    func testRequestsMatchTheVLLMAdminAPI() throws {
        let c = try AdminClient(server: "http://h:1", token: "t", environment: [:])
        let load = try c.loadRequest(name: "sql", path: "/srv/adapters/sql.lora")
        XCTAssertEqual(load.method, "POST")
        XCTAssertEqual(load.url, "http://h:1/v1/load_lora_adapter")
        XCTAssertEqual(load.headers["Content-Type"], "application/json")
        XCTAssertEqual(try JSONSerialization.jsonObject(with: load.body!) as? [String: String],
                       ["lora_name": "sql", "lora_path": "/srv/adapters/sql.lora"])
        let byName = try c.loadRequest(name: "sql", path: nil)
        XCTAssertEqual(try JSONSerialization.jsonObject(with: byName.body!) as? [String: String], ["lora_name": "sql"])
        let unload = try c.unloadRequest(name: "sql")
        XCTAssertEqual(unload.url, "http://h:1/v1/unload_lora_adapter")
        XCTAssertEqual(try JSONSerialization.jsonObject(with: unload.body!) as? [String: String], ["lora_name": "sql"])
    }

    func testErrorsCarryTheServersMessage() throws {
        let body = Data(#"{"error":{"message":"unknown adapter 'x'","type":"NotFoundError","code":404}}"#.utf8)
        XCTAssertThrowsError(try AdminClient.interpret(status: 404, body: body)) { e in
            XCTAssertEqual(e as? AdminClient.ServerError, .init(status: 404, message: "unknown adapter 'x'"))
        }
        XCTAssertThrowsError(try AdminClient.interpret(status: 502, body: Data("bad gateway".utf8))) { e in
            XCTAssertEqual((e as? AdminClient.ServerError)?.message, "bad gateway")
        }
        XCTAssertEqual(try AdminClient.interpret(status: 200, body: Data("{}".utf8)), Data("{}".utf8))
    }

    func testUnreachableServerIsAnErrorNotAHang() async throws {
        // Port 9 on loopback: nothing listens there.
        let c = try AdminClient(server: "http://127.0.0.1:9", environment: [:])
        do {
            _ = try await c.send(c.listRequest(), timeout: .seconds(2))
            XCTFail("expected a connection error")
        } catch {}
    }
}
