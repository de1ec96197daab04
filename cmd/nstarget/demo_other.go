//go:build !linux

package main

import (
	"fmt"
	"io"
	"runtime"
)

// cmdDemo says why instead of being absent: the demo builds tenant namespaces and veth pairs
// with ip(8), which exist only on Linux, and the other commands (check, example) still work.
func cmdDemo(args []string, stdout, stderr io.Writer) error {
	return fmt.Errorf("demo: not supported on %s: it needs Linux network namespaces", runtime.GOOS)
}
