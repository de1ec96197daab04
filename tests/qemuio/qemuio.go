// Package qemuio drives an interactive qemu-io (libiscsi's initiator inside qemu's block
// layer) for the tests: one iSCSI login that stays up while the test sends it commands one
// at a time, from inside a network namespace. Tests only.
package qemuio

import (
	"bufio"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"sync"
	"time"
)

// Session is one running qemu-io.
type Session struct {
	cmd      *exec.Cmd
	stdin    io.WriteCloser
	lines    chan string // what qemu-io says, line by line; closed when it exits
	patience time.Duration

	mu   sync.Mutex
	said strings.Builder // everything so far, for what a command's result does not show
}

// Start runs qemu-io on url inside the network namespace file nsPath. A command that gets no
// answer within patience fails.
func Start(nsPath, url string, patience time.Duration) (*Session, error) {
	cmd := exec.Command("nsenter", "--net="+nsPath, "qemu-io", "-f", "raw", url)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("qemu-io %s in %s: %w", url, nsPath, err)
	}
	go func() { cmd.Wait(); pw.Close() }()
	s := &Session{cmd: cmd, stdin: stdin, lines: make(chan string, 64), patience: patience}
	go func() {
		defer close(s.lines)
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			// Interactive qemu-io prints its prompt before each answer.
			line := strings.TrimSpace(sc.Text())
			for strings.HasPrefix(line, "qemu-io>") {
				line = strings.TrimSpace(strings.TrimPrefix(line, "qemu-io>"))
			}
			s.mu.Lock()
			s.said.WriteString(line + "\n")
			s.mu.Unlock()
			s.lines <- line
		}
	}()
	return s, nil
}

// Do runs one command and returns nil once qemu-io reports it done ("wrote …", "read …"), or
// an error with what it said instead.
func (s *Session) Do(command string) error {
	if _, err := io.WriteString(s.stdin, command+"\n"); err != nil {
		return fmt.Errorf("%s: %w", command, err)
	}
	var said []string
	deadline := time.After(s.patience)
	for {
		select {
		case line, ok := <-s.lines:
			if !ok {
				return fmt.Errorf("%s: qemu-io ended: %s", command, strings.Join(said, " | "))
			}
			said = append(said, line)
			switch {
			case strings.Contains(line, "failed"), strings.Contains(line, "Pattern verification"):
				return fmt.Errorf("%s: %s", command, strings.Join(said, " | "))
			case strings.HasPrefix(line, "wrote "), strings.HasPrefix(line, "read "):
				return nil
			}
		case <-deadline:
			return fmt.Errorf("%s: no answer within %v: %s", command, s.patience, strings.Join(said, " | "))
		}
	}
}

// Output is everything qemu-io has said so far (libiscsi's notices of unit attentions, say).
func (s *Session) Output() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.said.String()
}

// Close ends qemu-io and its login.
func (s *Session) Close() {
	s.stdin.Close()
	s.cmd.Process.Kill()
}
