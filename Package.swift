// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "meshtrace",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "meshtrace", targets: ["meshtrace"]),
        .library(name: "Capture", targets: ["Capture"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // The C boundary: one system-library target per C library, found through pkg-config.
        .systemLibrary(
            name: "CPcap",
            pkgConfig: "libpcap",
            providers: [.apt(["libpcap-dev"])]
        ),
        .systemLibrary(
            name: "CNflog",
            pkgConfig: "libnetfilter_log",
            providers: [.apt(["libnetfilter-log-dev"])]
        ),
        // Everything but argument parsing: sources -> decode -> correlate -> report,
        // with the ruleset model, the instrumentation and the lab beside them.
        .target(
            name: "Capture",
            dependencies: ["CPcap", "CNflog"],
            swiftSettings: [.unsafeFlags(["-Ounchecked"], .when(configuration: .release))]
        ),
        .executableTarget(
            name: "meshtrace",
            dependencies: [
                "Capture",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(
            name: "CaptureTests",
            dependencies: ["Capture"],
            resources: [.copy("Fixtures")]
        ),
    ],
    swiftLanguageModes: [.v5]
)
