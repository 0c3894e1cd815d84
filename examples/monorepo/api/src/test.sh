#!/bin/sh
# a stand-in test suite
echo "api: 3 tests passed"
