package main

import _ "embed"

// The demo's configuration lives outside demo_linux.go so that the test that parses it runs on
// every OS, where the demo itself cannot.

//go:embed demo.toml
var demoConfig string

// demoIQN is the one target name every demo tenant serves; demo.toml must agree.
const demoIQN = "iqn.2026-11.io.nstarget:demo"
