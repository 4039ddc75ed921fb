//go:build !linux

package main

// oDirect is Linux's; elsewhere records go through the page cache.
const oDirect = 0
