module modelfile_render

go 1.19
