//go:build !linux

package childproc

import "os/exec"

// pdeathsig: only Linux can tie a child's life to its parent's.
func pdeathsig(*exec.Cmd) {}
