// Command nstarget serves iSCSI block storage to many tenants, each in its own network
// namespace, from one process.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "nstarget: not implemented yet")
	os.Exit(2)
}
