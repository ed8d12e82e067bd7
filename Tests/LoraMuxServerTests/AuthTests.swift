import XCTest
@testable import LoraMuxServer

final class AuthTests: XCTestCase {
    func testBearerComparison() {
        XCTAssertTrue(bearerMatches("Bearer s3cret", "s3cret"))
        XCTAssertFalse(bearerMatches("Bearer s3cre", "s3cret"))
        XCTAssertFalse(bearerMatches("Bearer s3cret!", "s3cret"))
        XCTAssertFalse(bearerMatches("bearer s3cret", "s3cret"))
        XCTAssertFalse(bearerMatches(nil, "s3cret"))
        XCTAssertFalse(bearerMatches("", "s3cret"))
        XCTAssertFalse(bearerMatches("Bearer t3cret", "s3cret"))
    }
}
