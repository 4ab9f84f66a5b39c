module switchyard.dev/pause

go 1.26
