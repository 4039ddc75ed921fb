package main

import "syscall"

const oDirect = syscall.O_DIRECT
