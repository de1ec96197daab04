// Package childproc starts the helper processes of tests (Ceph daemons, qemu guests, servers)
// so that they die with the test binary, even when a panic or a timeout skips every cleanup,
// and are stopped only by their own PID.
//
// It must never be used for the processes under test's own children: only a test's.
package childproc

import (
	"fmt"
	"os/exec"
	"runtime"
	"syscall"
	"time"
)

// Proc is a child process started by Start; Stop and Kill act on its PID only.
type Proc struct {
	Name string
	Cmd  *exec.Cmd
	done chan struct{}
	err  error // valid after done
}

// Start starts cmd; the child dies with the test binary (on Linux; see pdeathsig).
func Start(cmd *exec.Cmd, name string) (*Proc, error) {
	p := &Proc{Name: name, Cmd: cmd, done: make(chan struct{})}
	pdeathsig(cmd)
	// Pdeathsig fires when the *thread* that forked the child exits, and Go ends a thread
	// whenever a goroutine locked to it returns (netns code does so on purpose, to drop a
	// thread left in another namespace). Forking from a thread locked until the child is
	// reaped keeps any other goroutine off it.
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.err = cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	return p, nil
}

// Done is closed when the process has exited and been reaped.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Err is what Wait returned; nil until the process has exited.
func (p *Proc) Err() error {
	if !p.Exited() {
		return nil
	}
	return p.err
}

func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Kill sends SIGKILL and waits until it is reaped.
func (p *Proc) Kill() {
	_ = p.Cmd.Process.Kill()
	<-p.done
}

// Stop sends SIGTERM and waits up to grace for the exit, then SIGKILL.
func (p *Proc) Stop(grace time.Duration) (killed bool) {
	if p.Exited() {
		return false
	}
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return false
	case <-time.After(grace):
	}
	_ = p.Cmd.Process.Kill()
	<-p.done
	return true
}
