// Package e2e holds the end-to-end tests of nstarget: the real binary (built with -race) serving
// tenants in real network namespaces with identical addresses, driven by real initiators
// (libiscsi tools, qemu-io) running inside paired initiator namespaces.
//
// It owns: its namespaces (prefix e2e-<pid>), the veth pairs between them, temporary pools and
// the nstarget processes it starts.
//
// It must never: touch namespaces, processes or files it did not create, or talk to any address
// outside the namespaces it created.
//
// Every test file starts with //go:build linux: the tests need network namespaces, and the tag
// keeps `GOOS=darwin go vet ./...` clean for the packages that do build elsewhere.
package e2e
