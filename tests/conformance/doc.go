// Package conformance runs libiscsi's iscsi-test-cu suites and real initiator tools against an
// nstarget target served inside a private network namespace.
//
// It owns only tests; it must never touch namespaces, processes or ports it did not create.
package conformance
