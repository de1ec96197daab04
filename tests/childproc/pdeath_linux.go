package childproc

import (
	"os/exec"
	"syscall"
)

// pdeathsig makes the kernel kill the child when the thread that forked it ends.
func pdeathsig(cmd *exec.Cmd) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
}
