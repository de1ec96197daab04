package cephtest

import "syscall"

// sysProcAttr makes the kernel kill a daemon when the test process dies without calling Stop
// (a panic, a test timeout), so no cluster outlives its test binary.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
