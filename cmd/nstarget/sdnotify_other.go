//go:build !linux

package main

// Elsewhere there is no systemd and no network namespace: nothing to wait for.

func monotonicMicros() int64 { return 0 }

func namespaceExists(string) bool { return false }
