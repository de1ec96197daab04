//go:build unix

package target

import "syscall"

// openFileLimit is the process's descriptor limit (Go raises the soft limit to the hard one
// at start-up; serve does it explicitly too).
func openFileLimit() int {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil || rl.Cur > 1<<30 {
		return 1 << 16
	}
	return int(rl.Cur)
}
