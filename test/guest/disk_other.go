//go:build !linux

package main

import (
	"errors"
	"os"
)

// oDirect is Linux's; elsewhere records go through the page cache.
const oDirect = 0

// discardRange is Linux's.
func discardRange(*os.File, uint64, uint64) (string, error) {
	return "", errors.New("discard needs Linux")
}
